"""`irece bench any-model`: the renderer-free path on any SD v1.x folder, command by command, as an operator runs it:
`irece head train` -> `irece calibrate` -> `irece serve --concept C` -> one `irece client` request per modality (text
prompt, learned embedding, inverted image). Each command's exit status and seconds are reported; nothing here
imports the mini world's renderer or judge.

Without --folder it builds the SD v1.4 architecture at random weights (benchmarks.gpu_check.random_sd14_folder; on a
CPU, --small keeps the architecture at smaller widths): the weights are noise, so the head and the calibration mean
nothing there; this checks that every piece runs on the real model's shapes (77-token CLIP text encoder, 4-level
cross-attention UNet, 8x VAE). On a real SD v1.4 folder, name the concepts a user may ask for with --concepts.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(name: str, argv: list[str], timeout: float, env: dict) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "irece_cli.main", *argv], capture_output=True, text=True,
                           timeout=timeout, env=env)
        rc, tail = p.returncode, (p.stderr or p.stdout)[-600:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, f"timed out after {timeout} s"
    return {"step": name, "command": "irece " + " ".join(argv), "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            **({"tail": tail} if rc else {})}


def _inputs(model: Path, work: Path) -> tuple[Path, Path]:
    """A learned embedding of the text encoder's width (random: it only has to travel) and an image of the model's
    native side."""
    from PIL import Image
    from safetensors.torch import save_file
    import torch

    width = json.loads((model / "text_encoder" / "config.json").read_text())["hidden_size"]
    side = 8 * json.loads((model / "unet" / "config.json").read_text())["sample_size"]
    emb = work / "learned.safetensors"
    save_file({"<x>": torch.randn(1, width, generator=torch.Generator().manual_seed(0)) * 0.02}, str(emb))
    img = work / "reference.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(img)
    return emb, img


def run(model: str | Path | None = None, concepts=("cat", "dog", "car"), small: bool = False, n: int = 8,
        steps: int = 4, device: str = "cpu", timeout: float = 1800, check: bool | None = None, keep: bool = False
        ) -> dict:
    """check: the head's label check (default: off on a random folder, whose classifier finds nothing). keep: leave
    the work folder (the random model, the images, the server log) in place; by default it is removed."""
    work = Path(tempfile.mkdtemp(prefix="irece-any-model-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    if model is None:
        from .gpu_check import random_sd14_folder
        kw = dict(sample_size=16, unet_channels=(32, 64, 64, 64), text_width=64, text_layers=2,
                  vae_channels=(32, 32, 64, 64)) if small else {}
        model = random_sd14_folder(work / "sd14-random", **kw)
    model = Path(model)
    check = (model.parent != work) if check is None else check
    rows = [{"step": "model", "folder": str(model), "random_sd14": model.parent == work, "small": small,
             "seconds": round(time.perf_counter() - t0, 1)}]
    head_dir = model / "concept_head"
    backup = work / "concept_head.orig"
    if head_dir.exists():  # a real folder's own head is put back afterwards
        shutil.move(str(head_dir), backup)
    try:
        rows.append(_run("head train", ["head", "train", "--model", str(model), "--concepts", *concepts, "--n", str(n),
                                        "--epochs", "5", "--cache", str(work / "cache"), "--device", device,
                                        *(() if check else ("--no-check",)), "--json"], timeout, env))
        rows.append(_run("calibrate", ["calibrate", "--model", str(model), "--n", str(n), "--n-held-out", str(n),
                                       "--device", device, *(() if check else ("--no-check",)), "--json"], timeout, env))
        port, metrics = _free_port(), _free_port()
        serve = subprocess.Popen([sys.executable, "-m", "irece_cli.main", "serve", "--model", str(model), "--concept",
                                  concepts[0], "--port", str(port), "--metrics-port", str(metrics), "--device",
                                  device, "--no-batching"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=open(work / "serve.log", "w"))
        t1 = time.perf_counter()
        try:
            up = _wait_serving(port, serve, timeout)
            rows.append({"step": "serve", "command": f"irece serve --model {model} --concept {concepts[0]}",
                         "rc": 0 if up else (serve.poll() or 1), "seconds": round(time.perf_counter() - t1, 1),
                         **({} if up else {"tail": (work / "serve.log").read_text()[-600:]})})
            if up:
                emb, img = _inputs(model, work)
                target = ["--target", f"127.0.0.1:{port}", "--steps", str(steps), "--json"]
                for name, extra in (("client text", ["--prompt", f"a photo of a {concepts[0]}"]),
                                    ("client embedding", ["--embedding", str(emb), "--prompt", "a photo of a <x>"]),
                                    ("client inverted", ["--image", str(img)])):
                    rows.append(_run(name, ["client", *target, "--out", str(work / f"{name.split()[1]}.png"),
                                            *extra], timeout, env))
        finally:
            serve.terminate()
            serve.wait(60)
    finally:
        if backup.exists():
            shutil.rmtree(head_dir, ignore_errors=True)
            shutil.move(str(backup), head_dir)
    res = {"rows": rows, "ok": all(r.get("rc", 0) == 0 for r in rows), "seconds": round(time.perf_counter() - t0, 1)}
    if keep:
        res["work"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _wait_serving(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    """Until the gRPC health service says SERVING (the server warms up first) or the process exits."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.time() < deadline and proc.poll() is None:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(1)
    return False
