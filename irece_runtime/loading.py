"""Build a Pipeline for a model folder on a chosen backend: the one place backends are picked."""
from __future__ import annotations

from pathlib import Path

from .pipeline import Pipeline

BACKENDS = ("torch", "onnx", "tensorrt")


def load_backend(model_dir: str | Path, erased: str | Path | None = None, backend: str = "torch",
                 graphs_dir: str | Path | None = None, layers: tuple[str, ...] | None = None, device: str = "cpu",
                 threads: int | None = None):
    """threads: ONNX Runtime's intra-op threads (None: its default); torch's are process-wide
    (torch.set_num_threads)."""
    if backend == "torch":
        from .backends.torch_backend import TorchBackend
        return TorchBackend(model_dir, erased, layers=layers, device=device)
    if backend in ("onnx", "tensorrt"):
        if graphs_dir is None:
            raise ValueError(f"backend {backend!r} needs --graphs DIR (build it with `irece export`)")
        if backend == "onnx":
            from .backends.onnxruntime_backend import OrtBackend
            return OrtBackend(graphs_dir, threads=threads)
        from .backends.tensorrt_backend import TrtBackend
        return TrtBackend(graphs_dir)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def load_pipeline(model_dir: str | Path, erased: str | Path | None = None, backend: str = "torch",
                  graphs_dir: str | Path | None = None, layers: tuple[str, ...] | None = None,
                  device: str = "cpu", threads: int | None = None) -> Pipeline:
    return Pipeline.from_model_dir(load_backend(model_dir, erased, backend, graphs_dir, layers, device, threads),
                                   model_dir)
