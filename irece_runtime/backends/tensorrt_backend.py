"""TensorRT backend: engines built from the exported ONNX graphs (`export/tensorrt_build.py`), run on CUDA
tensors through the same backend interface. The manifest records the TensorRT version and the GPU; a folder
built elsewhere is refused with a clear message (TensorRT engines are not portable).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..calls import row_limit
from . import BackendLimits
from .graph import GraphBackend, GraphMismatch, read_manifest

def tensorrt_module():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError("the tensorrt backend needs the `gpu` extra: pip install 'irece[gpu]'") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("the tensorrt backend needs a CUDA GPU")
    return trt


class TrtModule:
    """One deserialized engine, called with named CUDA tensors; returns its output (a tuple if several)."""

    def __init__(self, engine_path: Path, runtime, stream: torch.cuda.Stream):
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.ctx = self.engine.create_execution_context()
        self.stream = stream
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n).name == "OUTPUT"]

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        keep = []
        for name, t in inputs.items():
            t = t.detach().to("cuda", torch.float32).contiguous()
            self.ctx.set_input_shape(name, tuple(t.shape))
            self.ctx.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = []
        for name in self.outputs:
            outs.append(torch.empty(tuple(self.ctx.get_tensor_shape(name)), device="cuda", dtype=torch.float32))
            self.ctx.set_tensor_address(name, outs[-1].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()  # inputs in `keep` must outlive the kernels
        return outs[0] if len(outs) == 1 else tuple(outs)


def in_chunks(module, max_rows: int, **inputs: torch.Tensor):
    """`module` on at most max_rows rows at a time (an engine's batch profile), outputs joined along the batch: a
    caller may ask for more rows than the engines were built for (the classifier gate's K + 1 prompts per image and
    re-noising timestep)."""
    n = int(next(iter(inputs.values())).shape[0])
    if n <= max_rows:
        return module(**inputs)
    parts = [module(**{k: v[s:s + max_rows] for k, v in inputs.items()}) for s in range(0, n, max_rows)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def check_engine_compat(info: dict | None, trt_version: str, gpu: str, where="engine folder") -> dict:
    """TensorRT engines run only on the TensorRT version and GPU model they were built with."""
    if not info:
        raise GraphMismatch(f"{where}: no TensorRT engines; run `irece export --backend tensorrt`")
    if info["version"] != trt_version:
        raise GraphMismatch(f"{where}: engines built with TensorRT {info['version']}, this is {trt_version}; "
                             f"rebuild with `irece export --backend tensorrt`")
    if info["gpu"] != gpu:
        raise GraphMismatch(f"{where}: engines built for {info['gpu']}, this GPU is {gpu}; rebuild them")
    return info


class TrtBackend(GraphBackend):
    def __init__(self, graphs_dir: str | Path):
        trt = tensorrt_module()
        self.dir = Path(graphs_dir)
        self.device = torch.device("cuda")
        m = read_manifest(graphs_dir)
        info = check_engine_compat(m.get("tensorrt"), trt.__version__, torch.cuda.get_device_name(0), graphs_dir)
        self._configure(m)
        self.limits = BackendLimits(info["max_batch"], self.limits.latent_size)  # the engines' batch profile
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.stream = torch.cuda.Stream()
        loaded: dict = {}
        for name, f in info["engines"].items():
            if f not in loaded:
                loaded[f] = TrtModule(self.dir / f, runtime, self.stream)
        self.modules = {name: loaded[f] for name, f in info["engines"].items()}
        self.token_embedding = load_file(str(self.dir / "token_embedding.safetensors"))["weight"].cuda()

    def _run(self, component: str, **inputs: torch.Tensor) -> torch.Tensor:
        kind = "eps" if component.startswith("unet") else component  # the engine's profile, as it was built
        return in_chunks(self.modules[component], row_limit(kind, self.limits.max_batch), **inputs)
