"""Server configuration: the operator's policy (erased concepts, IRECE settings) and serving limits.

A TOML or JSON file (`irece serve --config FILE`) or the same fields from flags. Requests can add
concepts to suppress but never remove or weaken these.
"""
from __future__ import annotations

import ipaddress
import json
import random
import socket
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from irece_runtime.irece import IreceConfig, parse_t_star
from irece_runtime.policy import IRECE_FIELDS, PAPER, has_calibration, resolve
from miniworld.assets import MODEL_DIR


@dataclass
class ServerConfig:
    model: str = str(MODEL_DIR)  # the mini world by default; a real SD v1.x folder in production
    erased: str | None = None
    backend: str = "torch"  # torch | onnx | tensorrt
    graphs: str | None = None  # exported graph folder (onnx/tensorrt backends)
    device: str = "cpu"
    threads: int | None = None  # intra-op threads of torch (process-wide) and ONNX Runtime; None: their defaults
    localizer_layers: list[str] | None = None  # torch backend: attention layers the localizer averages (None = all)
    # operator policy: a named policy (irece_runtime/policy.py; None: the recommended one where concepts are named),
    # its model-dependent numbers from the model's calibration block; every field below left unset (None) comes from
    # the policy, one given overrides it
    concepts: list[str] = field(default_factory=list)  # always suppressed with IRECE
    policy: str | None = None  # "gated" (recommended) | "paper" (the seed paper's always-on IRECE)
    tau: float | None = None
    t_star: float | int | None = None  # a fraction of the schedule (0.3) or a step index (7)
    mode: str | None = None
    template: str | None = None
    per_concept: dict | None = None  # concept -> {"tau", "t_star", "threshold"} (`irece bench tune`)
    gate: str | None = None  # "off": always intervene (the paper); "head" / "classifier": only where present
    threshold: float | None = None  # the presence gate's threshold
    vocabulary: list[str] | None = None  # competing concepts beside the model's concepts.json
    classifier_timesteps: list[int] | None = None  # the classifier gate's t'
    classifier_early_exit: bool | None = None  # the classifier gate stops at the t' where its decisions are taken
    keep_outside: bool | None = None  # inverted latents: outside IRECE's mask, the input's own latent and pixels
    keep_others: bool | None = None  # with keep_outside and gate "head": the other concepts' pixels inside the mask too
    grow: int | None = None  # cells by which IRECE's mask grows before re-noising (a concept head's core cells)
    negative_guidance: float | None = None  # re-noised regions steered away from their concepts (standard UNet)
    negative_guidance_steps: int | None = None  # steer only this many steps after a re-noising (0: to the end)
    negative_guidance_every: int | None = None  # the steering direction computed every this many steps (1: each)
    nonfinite: str | None = None  # NaN/inf latent or concept map at t*: "error" (refuse) or "full_mask"
    conditioning: str | None = None  # "null": drop a conditioning where the gate saw a target
    conditioning_threshold: float | None = None  # classifier gate: conditioning score from which it is dropped
    conditioning_unet: str | None = None  # classifier gate: which UNet reads the conditioning
    recheck: list[float | int] | None = None  # later points where IRECE runs again (like t_star)
    recheck_threshold: list[float] | None = None  # each recheck look's presence threshold (the calibration's)
    allowed_concepts: list[str] | None = None  # what requests may add; None = model's concepts.json + operator's
    hide_scores: bool = False  # responses carry no presence score, threshold or peak (NaN): less for attackers
    # serving
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9464
    # requests generating at once; None: max_batch when batching, else 1
    workers: int | None = None
    queue_size: int = 4  # requests waiting beyond the workers; more get RESOURCE_EXHAUSTED
    # step-level batching: one scheduler runs the engine calls of all generating requests together
    batching: bool = True  # False: each request runs its own denoising loop in its own thread (the old server)
    max_batch: int = 16  # images per engine call (a UNet call carries 2 x this: both guidance branches)
    gather_ms: float = 2.0  # an idle scheduler waits this long for requests arriving together before its first tick
    default_steps: int = 25
    max_steps: int = 100
    default_guidance: float = 5.0
    max_side: int | None = None  # pixels; None = twice the model's native side (its sample_size x VAE factor)
    # work per request in native-image steps: (height x width / native pixels) x steps, x2 for inversion;
    # None = 2 x max_steps (a native-size request at max_steps, even inverted)
    cost_budget: float | None = None
    max_request_seconds: float = 300.0  # hard limit on one request's generation (not its wait in the queue)
    max_message_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_decodes: int = 1  # images decoded at once (a 4096x4096 decode holds ~50 MB); decoding starts once admitted
    # on SIGTERM: queued work refused at once, running work gets this long; the process is gone within it + ~2 s, inside
    # Kubernetes' default 30 s grace (deploy/k8s/: 45 s grace, a 5 s preStop first)
    drain_seconds: float = 20.0
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_tokens: list[str] = field(default_factory=list)  # bearer tokens; empty = no auth
    auth_token_file: str | None = None  # bearer tokens, one a line (added to auth_tokens)
    insecure: bool = False  # allow bearer tokens without TLS on a non-loopback host (they travel in clear)
    health_port: int | None = None  # plaintext grpc.health.v1 alone on this port (no Generation, no reflection): for
    # Kubernetes' grpc probes and the image's HEALTHCHECK when the main port serves TLS

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
        if "recheck" in raw:
            raw["recheck"] = [parse_t_star(r) for r in raw["recheck"]]
        return cls(**raw)

    def irece_config(self) -> IreceConfig:
        """The operator's IRECE: the named policy on this model, with the fields this config sets on top."""
        overrides = {name: getattr(self, name) for name in IRECE_FIELDS if getattr(self, name, None) is not None}
        policy = self.policy
        if policy is None and not self.concepts and not has_calibration(self.model):
            policy = PAPER  # nothing protected by the operator and no calibrated head: requests' concepts get the paper's
        return resolve(policy, self.model, self.concepts, overrides)

    def tokens(self) -> list[str]:
        """Every bearer token: auth_tokens plus auth_token_file's lines (blank lines and # comments skipped)."""
        tokens = list(self.auth_tokens)
        if self.auth_token_file:
            lines = Path(self.auth_token_file).read_text().splitlines()
            from_file = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
            if not from_file:
                raise ValueError(f"auth_token_file {self.auth_token_file}: no token in it")
            tokens += from_file
        return tokens

    def check_security(self) -> None:
        """Refuse to start rather than serve less securely than configured: half a TLS config, or bearer tokens in
        clear on a non-loopback host (unless `insecure`)."""
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(f"{given} is set but {missing} is not: TLS needs both (refusing to start without TLS)")
        if self.tokens() and not self.tls_cert and not is_loopback(self.host) and not self.insecure:
            raise ValueError(f"bearer tokens without TLS on {self.host} would travel in clear: set tls_cert and "
                             "tls_key, serve on a loopback host, or pass --insecure (insecure = true)")

    def check_serving(self) -> None:
        """Refuse to start on serving settings that cannot work (instead of failing every request)."""
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.gather_ms <= 1000:
            raise ValueError(f"gather_ms must be in 0..1000, got {self.gather_ms}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["auth_tokens"] = ["***"] * len(self.auth_tokens)
        return d


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any address
        return False


def configure(path: str | Path | None, overrides: dict | None = None) -> ServerConfig:
    """The config file (or the defaults) with `overrides` (flags) applied: how `irece serve` and every Ray replica
    build the same configuration."""
    cfg = ServerConfig.load(path) if path else ServerConfig()
    known = {f.name for f in fields(ServerConfig)}
    for key, value in (overrides or {}).items():
        if key not in known:
            raise ValueError(f"unknown config key {key!r}")
        setattr(cfg, key, value)
    return cfg


# where free_port looks: below Linux's ephemeral range (32768-60999), where the kernel hands out ports to whoever binds
# port 0, and above Ray's worker ports (10002-19999). A port from the ephemeral range was taken between free_port and
# the bind by one of the processes ray.init starts (measured: test_ray's proxy failed to bind once in a CI run).
FREE_PORTS = (20000, 32767)


def free_port() -> int:
    """A loopback port free right now, for a server whose port its starter must know before it listens; picked at
    random outside the ranges the kernel and Ray assign by themselves (FREE_PORTS)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(*FREE_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {FREE_PORTS[0]}-{FREE_PORTS[1]} after 200 tries")
