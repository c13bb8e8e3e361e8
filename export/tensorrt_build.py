"""TensorRT engines built from the exported ONNX graphs with the tensorrt Python API (run side:
irece_runtime/backends/tensorrt_backend.py).

Built per engine folder: fp16 optional, one optimization profile over batch (1..max_batch, CFG doubles the
batch), a timing cache kept beside the engines. The manifest records the TensorRT version and the GPU; an
engine folder built elsewhere is refused with a clear message (TensorRT engines are not portable).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from irece_runtime.backends.graph import MANIFEST, read_manifest
from irece_runtime.backends.tensorrt_backend import tensorrt_module

TIMING_CACHE = "timing.cache"


MAX_CONCEPTS = 32  # competing concepts in one localization prompt (the operator's plus the vocabulary)


def dynamic_dim_names(onnx_path: Path) -> dict[tuple[str, int], str]:
    """(input name, axis) -> the axis' symbolic name in the ONNX graph ("B", "K")."""
    import onnx
    g = onnx.load(str(onnx_path), load_external_data=False).graph
    return {(i.name, d): dim.dim_param for i in g.input for d, dim in enumerate(i.type.tensor_type.shape.dim)
            if dim.dim_param}


def build_engine(onnx_path: Path, engine_path: Path, fp16: bool, max_batch: int, cache_path: Path,
                 workspace_gb: float = 8.0, max_concepts: int = MAX_CONCEPTS) -> None:
    """One ONNX graph -> one serialized engine: optional fp16, a batch profile 1..max_batch, a timing cache."""
    trt = tensorrt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    names = dynamic_dim_names(onnx_path)
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        # dynamic axes by their ONNX name: B (batch) up to max_batch, K (competing concepts) up to max_concepts
        top = [({"K": max_concepts}.get(names.get((inp.name, d)), max_batch) if s == -1 else s)
               for d, s in enumerate(shape)]
        profile.set_shape(inp.name, [1 if s == -1 else s for s in shape], top, top)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path.name}")
    engine_path.write_bytes(bytes(blob))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))


def build_engines(graphs_dir: str | Path, fp16: bool = True, max_batch: int = 2) -> dict:
    trt = tensorrt_module()
    d = Path(graphs_dir)
    m = read_manifest(d)
    t0 = time.time()
    built: dict = {}
    for name, comp in m["components"].items():
        onnx_file = comp["file"]
        engine_file = onnx_file.replace(".onnx", ".fp16.engine" if fp16 else ".fp32.engine")
        if engine_file not in built.values():
            batched = max_batch * (2 if name.startswith("unet") else 1)  # CFG doubles the UNet batch
            build_engine(d / onnx_file, d / engine_file, fp16, batched, d / TIMING_CACHE)
        built[name] = engine_file
    m["tensorrt"] = {"version": trt.__version__, "gpu": torch.cuda.get_device_name(0),
                     "compute_capability": list(torch.cuda.get_device_capability(0)),
                     "precision": "fp16" if fp16 else "fp32", "max_batch": max_batch, "engines": built,
                     "seconds": round(time.time() - t0, 1)}
    (d / MANIFEST).write_text(json.dumps(m, indent=2))
    return m
