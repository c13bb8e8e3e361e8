"""Server configuration: the operator's policy (erased concepts, IRECE settings) and serving limits.

A TOML or JSON file (`irece serve --config FILE`) or the same fields from flags. Requests can add
concepts to suppress but never remove or weaken these.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from irece_runtime.irece import IreceConfig, parse_t_star
from miniworld.assets import MODEL_DIR

IRECE = IreceConfig.defaults()  # the operator policy's defaults are IRECE's own


@dataclass
class ServerConfig:
    model: str = str(MODEL_DIR)  # the mini world by default; a real SD v1.x folder in production
    erased: str | None = None
    backend: str = "torch"  # torch | onnx | tensorrt
    graphs: str | None = None  # exported graph folder (onnx/tensorrt backends)
    device: str = "cpu"
    localizer_layers: list[str] | None = None  # torch backend: attention layers the localizer averages (None = all)
    # operator policy
    concepts: list[str] = field(default_factory=list)  # always suppressed with IRECE
    tau: float = IRECE.tau
    t_star: float | int = IRECE.t_star  # a fraction of the schedule (0.3) or a step index (7)
    mode: str = IRECE.mode
    template: str = IRECE.template
    min_peak: float = IRECE.min_peak
    per_concept: dict = field(default_factory=dict)  # concept -> {"tau", "t_star", "threshold"} (`irece bench tune`)
    gate: str = IRECE.gate  # "off": always intervene (the paper); "contrastive": only where the concept is present
    threshold: float = IRECE.threshold  # the contrastive gate's presence threshold (`irece bench tune`)
    vocabulary: list[str] = field(default_factory=list)  # competing concepts beside the model's concepts.json
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
        if "t_star" in raw:
            raw["t_star"] = parse_t_star(raw["t_star"])
        return cls(**raw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["auth_tokens"] = ["***"] * len(self.auth_tokens)
        return d
