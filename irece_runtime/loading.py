"""Build a Pipeline for a model folder on a chosen backend."""
from __future__ import annotations

from pathlib import Path

from .pipeline import Pipeline

BACKENDS = ("torch", "onnx", "tensorrt")


def load_pipeline(model_dir: str | Path, erased: str | Path | None = None, backend: str = "torch",
                  engines_dir: str | Path | None = None, layers: tuple[str, ...] | None = None,
                  device: str = "cpu") -> Pipeline:
    if backend == "torch":
        from .engines import TorchEngines
        engines = TorchEngines(model_dir, erased, layers=layers, device=device)
    elif backend in ("onnx", "tensorrt"):
        if engines_dir is None:
            raise ValueError(f"backend {backend!r} needs --engines ENGINE_DIR (build it with `irece export`)")
        if backend == "onnx":
            from export.ort_backend import OrtEngines
            engines = OrtEngines(engines_dir)
        else:
            from export.trt_backend import TrtEngines
            engines = TrtEngines(engines_dir)
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return Pipeline.from_model_dir(engines, model_dir)
