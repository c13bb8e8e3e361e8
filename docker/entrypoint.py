"""The image's entry point: `irece serve` with the container's arguments, read the way `irece serve` reads them
(--config FILE, the flags over it), so that a config file naming the model, erased UNet, backend and graph folder
does what the same flags do. Before serving it builds the graph folder (ONNX graphs, TensorRT engines) when the
onnx/tensorrt backend finds none for this GPU and TensorRT version, and it writes where the server answers health
checks ($IRECE_RUN_DIR/health.json) for the HEALTHCHECK (docker/healthcheck.py): its port and TLS follow the config.
In a container the server listens on every interface unless the flags or the config file name a host.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tomllib
from pathlib import Path

RUN_DIR = Path(os.environ.get("IRECE_RUN_DIR", "/tmp/irece"))
WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def parse(argv: list[str]):
    """(parsed `irece serve` arguments, ServerConfig) exactly as `irece serve` builds them."""
    from irece_cli.main import build_parser
    from server.cli import serve_overrides
    from server.config import configure
    a = build_parser().parse_args(["serve", *argv])
    return a, configure(a.config, serve_overrides(a))


def serve_argv(argv: list[str]) -> list[str]:
    """The container's arguments, plus --host 0.0.0.0 where neither they nor the config file name a host."""
    a, _ = parse(argv)
    if a.host is not None:
        return argv
    if a.config:
        text = Path(a.config).read_text()
        raw = tomllib.loads(text) if a.config.endswith(".toml") else json.loads(text)
        if "host" in raw:
            return argv
    return ["--host", "0.0.0.0", *argv]


def needs_graphs(cfg) -> bool:
    """The onnx/tensorrt backends need a graph folder: none yet, or TensorRT engines built for another GPU or
    TensorRT version (they fail to load)."""
    if cfg.backend == "torch" or not cfg.graphs:
        return False
    if not (Path(cfg.graphs) / "manifest.json").is_file():
        return True
    if cfg.backend == "tensorrt":
        try:
            from irece_runtime.backends.tensorrt_backend import TrtBackend
            TrtBackend(cfg.graphs)
        except Exception as exc:  # noqa: BLE001 - any failure to load them means: build them here
            logging.warning("TensorRT engines in %s do not load here (%s): building them", cfg.graphs, exc)
            return True
    return False


def export_argv(cfg) -> list[str]:
    argv = ["export", "--model", cfg.model, "--out", cfg.graphs, "--backend", cfg.backend, "--fp16",
            "--max-batch", str(cfg.max_batch)]
    if cfg.erased:
        argv += ["--erased", cfg.erased]
    if cfg.localizer_layers:
        argv += ["--localizer-layers", *cfg.localizer_layers]
    return argv


def health_target(cfg) -> dict:
    """Where and how the HEALTHCHECK asks: the plaintext health port if there is one, else the server's port, over
    TLS when the server serves TLS (its own certificate as the root: a self-signed one; with a CA-issued certificate
    set health_port)."""
    host = "127.0.0.1" if cfg.host in WILDCARDS or cfg.host == "localhost" else cfg.host
    if cfg.health_port is not None:
        return {"address": f"{host}:{cfg.health_port}", "tls_cert": None}
    return {"address": f"{host}:{cfg.port}", "tls_cert": str(Path(cfg.tls_cert).resolve()) if cfg.tls_cert else None}


def main(argv: list[str]) -> None:
    if argv[:1] in (["--help"], ["-h"]):
        os.execvp("irece", ["irece", "serve", "--help"])
    argv = serve_argv(argv)
    _, cfg = parse(argv)
    if needs_graphs(cfg):
        from irece_cli.main import main as irece
        if irece(export_argv(cfg)) != 0:
            sys.exit(2)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    (RUN_DIR / "health.json").write_text(json.dumps(health_target(cfg)))
    os.execvp("irece", ["irece", "serve", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
