"""Server configuration: the operator's policy (erased concepts, IRECE settings) and serving limits.

A TOML or JSON file (`irece serve --config FILE`) or the same fields from flags. Requests can add
concepts to suppress but never remove or weaken these.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from miniworld.assets import MODEL_DIR


@dataclass
class ServerConfig:
    model: str = str(MODEL_DIR)  # the mini world by default; a real SD v1.x folder in production
    erased: str | None = None
    backend: str = "torch"  # torch | onnx | tensorrt
    engines: str | None = None
    device: str = "cpu"
    localizer_layers: list[str] | None = None  # torch backend: attention layers the localizer averages (None = all)
    # operator policy
    concepts: list[str] = field(default_factory=list)  # always suppressed with IRECE
    tau: float = 0.4
    t_star: float | int = 0.3
    mode: str = "replace"
    template: str = "a photo of a {concept}"
    min_peak: float = 0.0
    per_concept: dict = field(default_factory=dict)  # concept -> {"tau": .., "t_star": ..} (`irece bench tune`)
    allowed_concepts: list[str] | None = None  # what requests may add; None = model's concepts.json + operator's
    # serving
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9464
    workers: int = 1  # requests generating at once
    queue_size: int = 4  # requests waiting beyond the workers; more get RESOURCE_EXHAUSTED
    default_steps: int = 25
    max_steps: int = 100
    default_guidance: float = 5.0
    max_side: int = 1024  # pixels
    max_message_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    drain_seconds: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_tokens: list[str] = field(default_factory=list)  # bearer tokens; empty = no auth

    @classmethod
    def load(cls, path: str | Path) -> "ServerConfig":
        path = Path(path)
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**raw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["auth_tokens"] = ["***"] * len(self.auth_tokens)
        return d
