"""TensorRT engines built from the exported ONNX graphs with the tensorrt Python API (run side:
irece_runtime/backends/tensorrt_backend.py).

Built per engine folder: fp16 optional, one optimization profile over batch (1..max_batch images, CFG doubles
the UNet's rows; the per-sample timestep follows the batch), a timing cache kept beside the engines. A batched
server (`irece serve --max-batch N`) needs engines built with `irece export --backend tensorrt --max-batch N`.
The manifest records the TensorRT version and the GPU; an engine folder built elsewhere is refused with a clear
message (TensorRT engines are not portable).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from irece_runtime.backends.graph import MANIFEST, read_manifest
from irece_runtime.backends.tensorrt_backend import tensorrt_module
from irece_runtime.calls import row_limit

TIMING_CACHE = "timing.cache"


MAX_CONCEPTS = 32  # competing concepts in one localization prompt (the operator's plus the vocabulary)


def profile_shapes(onnx_path: Path, max_batch: int, max_concepts: int = MAX_CONCEPTS) -> dict[str, tuple]:
    """input name -> (min, opt, max) shapes of the engine's one optimization profile, from the ONNX graph's inputs:
    a dynamic axis named B (the batch: latents, hidden states and the per-sample timestep alike) spans 1..max_batch,
    K (competing concepts) 1..max_concepts, static axes keep their size. opt = max: a batching server fills the
    batch under load, and load is where the engine's speed counts."""
    import onnx
    g = onnx.load(str(onnx_path), load_external_data=False).graph
    out = {}
    for inp in g.input:
        dims = inp.type.tensor_type.shape.dim
        lo = [1 if d.dim_param else d.dim_value for d in dims]
        hi = [({"K": max_concepts}.get(d.dim_param, max_batch) if d.dim_param else d.dim_value) for d in dims]
        out[inp.name] = (tuple(lo), tuple(hi), tuple(hi))
    return out


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
    shapes = profile_shapes(onnx_path, max_batch, max_concepts)
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path.name}")
    engine_path.write_bytes(bytes(blob))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))


def engine_batch(component: str, max_batch: int) -> int:
    """Rows an engine must take for max_batch images (requests) per call: the UNet's call carries both guidance
    branches, so twice as many. The batched server's scheduler packs calls to the same limits (`calls.row_limit`)."""
    return row_limit("eps" if component.startswith("unet") else component, max_batch)


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
            batched = engine_batch(name, max_batch)
            build_engine(d / onnx_file, d / engine_file, fp16, batched, d / TIMING_CACHE)
        built[name] = engine_file
    m["tensorrt"] = {"version": trt.__version__, "gpu": torch.cuda.get_device_name(0),
                     "compute_capability": list(torch.cuda.get_device_capability(0)),
                     "precision": "fp16" if fp16 else "fp32", "max_batch": max_batch, "engines": built,
                     "seconds": round(time.time() - t0, 1)}
    (d / MANIFEST).write_text(json.dumps(m, indent=2))
    return m
