"""TensorRT backend: engines built from the exported ONNX graphs with the tensorrt Python API, run on CUDA
tensors through the same Engines interface.

Built per engine folder: fp16 optional, one optimization profile over batch (1..max_batch, CFG doubles the
batch), a timing cache kept beside the engines. The manifest records the TensorRT version and the GPU; an
engine folder built elsewhere is refused with a clear message (TensorRT engines are not portable).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .manifest import EngineMismatch, GraphEngines, read_manifest
from .onnx_export import MANIFEST

TIMING_CACHE = "timing.cache"


def _trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError("the tensorrt backend needs the `gpu` extra: pip install 'irece[gpu]'") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("the tensorrt backend needs a CUDA GPU")
    return trt


def build_engine(onnx_path: Path, engine_path: Path, fp16: bool, max_batch: int, cache_path: Path,
                 workspace_gb: float = 8.0) -> None:
    """One ONNX graph -> one serialized engine: optional fp16, a batch profile 1..max_batch, a timing cache."""
    trt = _trt()
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
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        profile.set_shape(inp.name, [1 if s == -1 else s for s in shape], [max_batch if s == -1 else s for s in shape],
                          [max_batch if s == -1 else s for s in shape])
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path.name}")
    engine_path.write_bytes(bytes(blob))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))


def build_engines(engine_dir: str | Path, fp16: bool = True, max_batch: int = 2) -> dict:
    trt = _trt()
    d = Path(engine_dir)
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


class TrtModule:
    """One deserialized engine, called with named CUDA tensors; returns its (single) output."""

    def __init__(self, engine_path: Path, runtime, stream: torch.cuda.Stream):
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.ctx = self.engine.create_execution_context()
        self.stream = stream
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output = next(n for n in names if self.engine.get_tensor_mode(n).name == "OUTPUT")

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        keep = []
        for name, t in inputs.items():
            t = t.detach().to("cuda", torch.float32).contiguous()
            self.ctx.set_input_shape(name, tuple(t.shape))
            self.ctx.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        out = torch.empty(tuple(self.ctx.get_tensor_shape(self.output)), device="cuda", dtype=torch.float32)
        self.ctx.set_tensor_address(self.output, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()  # inputs in `keep` must outlive the kernels
        return out


def check_engine_compat(info: dict | None, trt_version: str, gpu: str, where="engine folder") -> dict:
    """TensorRT engines run only on the TensorRT version and GPU model they were built with."""
    if not info:
        raise EngineMismatch(f"{where}: no TensorRT engines; run `irece export --backend tensorrt`")
    if info["version"] != trt_version:
        raise EngineMismatch(f"{where}: engines built with TensorRT {info['version']}, this is {trt_version}; "
                             f"rebuild with `irece export --backend tensorrt`")
    if info["gpu"] != gpu:
        raise EngineMismatch(f"{where}: engines built for {info['gpu']}, this GPU is {gpu}; rebuild them")
    return info


class TrtEngines(GraphEngines):
    def __init__(self, engine_dir: str | Path):
        trt = _trt()
        self.dir = Path(engine_dir)
        self.device = torch.device("cuda")
        m = read_manifest(engine_dir)
        info = check_engine_compat(m.get("tensorrt"), trt.__version__, torch.cuda.get_device_name(0), engine_dir)
        self._configure(m)
        self.dtype = torch.float16 if info["precision"] == "fp16" else torch.float32
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.stream = torch.cuda.Stream()
        loaded: dict = {}
        for name, f in info["engines"].items():
            if f not in loaded:
                loaded[f] = TrtModule(self.dir / f, runtime, self.stream)
        self.modules = {name: loaded[f] for name, f in info["engines"].items()}
        self.token_embedding = load_file(str(self.dir / "token_embedding.safetensors"))["weight"].cuda()

    def _run(self, component: str, **inputs: torch.Tensor) -> torch.Tensor:
        return self.modules[component](**inputs)
