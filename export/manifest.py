"""Engine-folder manifest checks shared by the ONNX Runtime and TensorRT backends."""
from __future__ import annotations

import json
from pathlib import Path

from .onnx_export import MANIFEST


class EngineMismatch(RuntimeError):
    """The engine folder was built for another runtime version, GPU or format."""


def read_manifest(engine_dir: str | Path) -> dict:
    path = Path(engine_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{engine_dir}: no {MANIFEST}; build it with `irece export`")
    m = json.loads(path.read_text())
    if m.get("format") != "irece-engines/1":
        raise EngineMismatch(f"{path}: unknown engine format {m.get('format')!r}")
    return m
