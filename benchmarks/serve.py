"""`irece bench serve`: concurrent clients against the generation server, batched vs unbatched (and other serving
modes), per backend, in one run.

Each mode is a server started as its own process on 127.0.0.1 (`irece serve`, its gRPC port read from its log);
for every backend all modes are up at once and measured in turn at each client count, in alternating order (at one
client, where the latency ratio is read, in alternating rounds), so drift on a shared machine falls on every mode
alike. Every client is a thread with its own channel that sends a
bounded number of requests one after another; the requests cycle through a fixed mix of the three modalities (text
prompt, learned embedding, inverted latent from a rendered image), IRECE on (the operator's concept), a seed each.
Per mode and client count: requests/s (completed OK over the wall time), p50/p95 latency, and the mean batch size
(requests per UNet call, from the server's `irece_batch_size` histogram over the measured window; 1 by construction
for the unbatched server, whose requests each run their own loop). Request n is the same request (modality n mod 3,
seed n) at every client count and in every mode, so the run also compares each image served batched beside others
with the same request served alone by the unbatched server (`determinism`).

A mode is a function (spec, backend) -> a context manager that starts the server and yields a `Target`: "batched",
"unbatched" (`irece serve` processes) and "ray" (the batched service on Ray Serve, `spec.ray_replicas` replicas).
"""
from __future__ import annotations

import io
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import numpy as np

from miniworld.assets import MODEL_DIR as DEFAULT_MODEL
from server.config import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 4, 8, 16)


@dataclass
class Spec:
    """What every mode serves and how the load is generated."""
    model: str = str(DEFAULT_MODEL)
    erased: str | None = None  # None: the model's own UNet serves as the erased one (same work for every mode)
    graphs: str | None = None  # ONNX graph folder (exported once into .cache/bench when not given)
    concept: str = "star"  # the operator's concept: IRECE on for every request
    steps: int = 25
    guidance: float = 5.0
    clients: tuple[int, ...] = CLIENTS
    requests: int = 32  # per mode and client count (each client sends ceil(requests / clients), at least 4)
    rounds: int = 4  # the one-client level alternates the modes in this many rounds
    warmup: int = 3  # requests per mode before measuring (one per modality)
    threads: int = 1  # intra-op threads of each server process
    max_batch: int = 16
    gather_ms: float = 2.0
    unbatched_workers: int = 2  # the server as it was: one denoising loop per worker thread
    timeout_s: float = 600.0  # per request
    extra_args: dict = field(default_factory=dict)  # mode name -> extra `irece serve` flags
    ray_replicas: int = 2  # the "ray" mode's replicas


@dataclass
class Target:
    """A running serving mode: where its gRPC Generation service listens, and its Prometheus endpoint (or None)."""
    address: str
    metrics_url: str | None = None
    batched: bool = True  # False: requests run alone by construction (mean batch 1)
    metrics_lag_s: float = 0.0  # how long its metrics endpoint may lag behind the requests it served


@contextmanager
def serve_process(spec: Spec, backend: str, batching: bool, args: list[str] | None = None) -> Iterator[Target]:
    """`irece serve` as a child process on 127.0.0.1 (batching on or off); stopped (SIGTERM, no drain) on exit."""
    metrics_port = free_port()
    cmd = [sys.executable, "-m", "irece_cli.main", "serve", "--model", spec.model, "--concept", spec.concept,
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(metrics_port), "--backend", backend,
           "--threads", str(spec.threads), "--drain-seconds", "0", "--max-request-seconds", str(spec.timeout_s),
           "--queue-size", str(max(spec.clients) + 4)]
    if spec.erased:
        cmd += ["--erased", spec.erased]
    if backend == "onnx":
        cmd += ["--graphs", spec.graphs]
    if batching:
        cmd += ["--batching", "--max-batch", str(spec.max_batch), "--gather-ms", str(spec.gather_ms),
                "--workers", str(max(spec.max_batch, 1))]
    else:
        cmd += ["--no-batching", "--workers", str(spec.unbatched_workers)]
    cmd += args or []
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(spec.threads)}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines: queue.Queue = queue.Queue()
    tail: list[str] = []

    def pump():  # keep reading: a full pipe would block the server
        for line in proc.stderr:
            tail.append(line)
            del tail[:-50]
            lines.put(line)
    threading.Thread(target=pump, daemon=True).start()
    try:
        port = None
        deadline = time.monotonic() + 300
        while port is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"`irece serve` did not start ({' '.join(cmd)}):\n{''.join(tail)}")
            try:
                m = re.search(r"serving \S+ on port (\d+)", lines.get(timeout=1))
            except queue.Empty:
                continue
            port = int(m.group(1)) if m else None
        yield Target(f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", batched=batching)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def serve_ray(spec: Spec, backend: str) -> Iterator[Target]:
    """The batched service as a Ray Serve deployment of `spec.ray_replicas` replicas behind Ray's gRPC proxy, on a
    local Ray instance started in this process (the clients' threads do not compete with the replicas' processes
    for the GIL). Its mean batch is read from Ray's metrics agent, which reports every second here."""
    from server.ray_serve import start_ray_server
    overrides = {"model": spec.model, "concepts": [spec.concept], "backend": backend, "host": "127.0.0.1",
                 "threads": spec.threads, "batching": True, "max_batch": spec.max_batch, "gather_ms": spec.gather_ms,
                 "workers": max(spec.max_batch, 1), "queue_size": max(spec.clients) + 4, "drain_seconds": 0,
                 "max_request_seconds": spec.timeout_s}
    if spec.erased:
        overrides["erased"] = spec.erased
    if backend == "onnx":
        overrides["graphs"] = spec.graphs
    server = start_ray_server(None, spec.ray_replicas, free_port(), overrides=overrides,
                              replica_cpus=1.0 / spec.ray_replicas, metrics_report_ms=1000, log_to_driver=False)
    try:
        yield Target(server.address, f"http://127.0.0.1:{server.metrics_port}/metrics", batched=True,
                     metrics_lag_s=2.5)
    finally:
        server.stop()


# mode name -> (spec, backend) -> context manager yielding a Target. Another serving mode is one more entry.
MODES: dict[str, Callable[[Spec, str], ContextManager[Target]]] = {
    "batched": lambda spec, backend: serve_process(spec, backend, True, spec.extra_args.get("batched")),
    "unbatched": lambda spec, backend: serve_process(spec, backend, False, spec.extra_args.get("unbatched")),
    "ray": serve_ray,
}


# -- the request mix -------------------------------------------------------------------------------------------
def request_mix(spec: Spec) -> list[Callable[[int], object]]:
    """seed -> GenerateRequest, one maker per modality: text prompt, learned embedding, inverted latent (a rendered
    image of the operator's concept, inverted by the server). IRECE is on through the operator's concept."""
    import json

    from PIL import Image

    from miniworld import shapes
    from protos.irece.v1 import generation_pb2 as pb
    from server.client import tensor_to_wire

    model = Path(spec.model)
    dim = json.loads((model / "text_encoder" / "config.json").read_text())["hidden_size"]
    vae = json.loads((model / "vae" / "config.json").read_text())
    side = json.loads((model / "unet" / "config.json").read_text())["sample_size"] * \
        2 ** (len(vae["block_out_channels"]) - 1)
    vec = np.random.default_rng(0).standard_normal((1, dim)).astype(np.float32)
    vec /= np.linalg.norm(vec)  # a learned vector of the size real ones have (L2 norm about 1)
    images = []
    for k in range(4):
        img = Image.fromarray(shapes.render(spec.concept, seed=k).image)
        buf = io.BytesIO()
        (img if img.size == (side, side) else img.resize((side, side), Image.NEAREST)).save(buf, format="PNG")
        images.append(buf.getvalue())

    def params(seed):
        return pb.GenerationParams(seed=seed, steps=spec.steps, guidance=spec.guidance)

    def text(seed):
        return pb.GenerateRequest(text=pb.TextPrompt(prompt=f"a red {spec.concept} on a black background"),
                                  params=params(seed))

    def embedding(seed):
        return pb.GenerateRequest(embedding=pb.EmbeddingPrompt(
            prompt="a <thing> on a white background",
            embeddings=[pb.LearnedEmbedding(token="<thing>", vectors=tensor_to_wire(vec))]), params=params(seed))

    def inverted(seed):
        return pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=images[seed % len(images)]),
                                  params=params(seed))
    return [text, embedding, inverted]


# -- measuring ---------------------------------------------------------------------------------------------------
def batch_histogram(metrics_url: str | None) -> tuple[float, float]:
    """(sum, count) of irece_batch_size{call="eps"}: requests per UNet call, summed and counted (over every
    replica's series; Ray's metrics agent prefixes the names with `ray_`, and the exact sum is a counter there)."""
    if not metrics_url:
        return 0.0, 0.0
    from prometheus_client.parser import text_string_to_metric_families
    body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.labels.get("call") == "eps":
                if s.name in ("irece_batch_size_sum", "ray_irece_batch_size_observed_sum_total"):
                    total += s.value  # (Ray's own ray_irece_batch_size_sum is summed from bucket midpoints)
                elif s.name in ("irece_batch_size_count", "ray_irece_batch_size_count"):
                    count += s.value
    return total, count


def load(target: Target, makers: list, queues: list[list[int]], timeout: float) -> dict:
    """One client thread per list of request indices, each sending its requests in turn (request n: modality
    n mod 3, seed n, so the same n is the same request at every client count and in every mode). Returns the wall
    time, the latencies of OK answers, the codes of all, and the PNG of every OK answer by index."""
    import grpc

    from protos.irece.v1 import generation_pb2_grpc as pb_grpc
    lat, codes, images, lock = [], {}, {}, threading.Lock()
    start = threading.Barrier(len(queues) + 1)

    def client(indices):
        with grpc.insecure_channel(target.address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            grpc.channel_ready_future(ch).result(timeout=30)
            start.wait()
            for n in indices:
                req = makers[n % len(makers)](n)
                t0 = time.perf_counter()
                try:
                    png = stub.Generate(req, timeout=timeout).png
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == "OK":
                        lat.append(time.perf_counter() - t0)
                        images[n] = png

    threads = [threading.Thread(target=client, args=(q,), daemon=True) for q in queues]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - t0, "latencies_s": lat, "codes": codes, "images": images}


def deal(first: int, clients: int, per_client: int) -> list[list[int]]:
    """Request indices first.. dealt round-robin to the clients (client k: first+k, first+k+clients, ...)."""
    return [[first + k + clients * j for j in range(per_client)] for k in range(clients)]


def determinism(images: dict, reference: str = "unbatched") -> dict:
    """Every image a batched mode served beside other requests (more than one client) against the same request
    served alone (the reference mode, which runs every request alone): how many compared, how many identical, the
    largest difference in uint8 levels. Also checks the reference against itself across client counts."""
    from PIL import Image

    def arr(png):
        return np.asarray(Image.open(io.BytesIO(png))).astype(int)
    alone: dict[int, bytes] = {}
    self_diff = 0
    for level in images.get(reference, {}).values():
        for n, png in level.items():
            if n in alone:
                self_diff = max(self_diff, int(np.abs(arr(png) - arr(alone[n])).max()))
            alone.setdefault(n, png)
    out = {}
    for mode, levels in images.items():
        if mode == reference:
            continue
        diffs = [int(np.abs(arr(png) - arr(alone[n])).max())
                 for clients, level in levels.items() if clients > 1 for n, png in level.items() if n in alone]
        if diffs:
            out[mode] = {"compared": len(diffs), "identical": sum(d == 0 for d in diffs),
                         "max_abs_diff_255": max(diffs)}
    out[f"{reference} across client counts"] = {"max_abs_diff_255": self_diff}
    return out


def run(spec: Spec, backends: tuple[str, ...] = ("torch", "onnx"), modes: tuple[str, ...] = ("batched", "unbatched"),
        progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown serving mode(s) {unknown}; known: {sorted(MODES)}")
    if "onnx" in backends and not spec.graphs:
        from .peers import our_engines
        spec.graphs = str(our_engines(Path(spec.model), Path(spec.erased) if spec.erased else None))
    makers = request_mix(spec)
    rows, same, t_run = [], {}, time.perf_counter()
    for backend in backends:
        with ExitStack() as stack:
            targets = {}
            for mode in modes:
                say(f"[{backend}] starting {mode} server")
                targets[mode] = stack.enter_context(MODES[mode](spec, backend))
            for mode, target in targets.items():  # warm-up: one request per modality, then a concurrent burst
                load(target, makers, deal(10_000, 1, spec.warmup), spec.timeout_s)
                load(target, makers, deal(20_000, min(4, max(spec.clients)), 1), spec.timeout_s)
            images: dict = {mode: {} for mode in targets}
            flip = False
            for clients in spec.clients:
                # each client sends at least 4 requests, so that ramp-up and ramp-down are a small part of the window
                per_client = max(4, math.ceil(spec.requests / clients))
                # one client: the latency ratio is read here, so the modes alternate in rounds (drift on a shared
                # core hits both); more clients: one round each, alternating from one client count to the next
                rounds = min(spec.rounds, per_client) if clients == 1 else 1
                acc = {mode: {"lat": [], "wall": 0.0, "codes": {}, "batch": [0.0, 0.0]} for mode in targets}
                first = 0
                for r in range(rounds):
                    order = list(targets)[::-1] if flip else list(targets)
                    flip = not flip
                    n = per_client // rounds + (r < per_client % rounds)
                    for mode in order:
                        target, a = targets[mode], acc[mode]
                        before = batch_histogram(target.metrics_url)
                        res = load(target, makers, deal(first, clients, n), spec.timeout_s)
                        time.sleep(target.metrics_lag_s)
                        after = batch_histogram(target.metrics_url)
                        images[mode].setdefault(clients, {}).update(res["images"])
                        a["lat"] += res["latencies_s"]
                        a["wall"] += res["wall_s"]
                        for code, k in res["codes"].items():
                            a["codes"][code] = a["codes"].get(code, 0) + k
                        a["batch"] = [a["batch"][0] + after[0] - before[0], a["batch"][1] + after[1] - before[1]]
                    first += clients * n
                for mode, a in acc.items():
                    ms = np.asarray(a["lat"]) * 1000
                    total, calls = a["batch"]
                    mean_batch = total / calls if calls else (1.0 if not targets[mode].batched else None)
                    row = {"mode": mode, "backend": backend, "clients": clients,
                           "rps": len(ms) / a["wall"] if len(ms) else 0.0,
                           "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
                           "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
                           "mean_batch": mean_batch, "requests": clients * per_client, "codes": a["codes"],
                           "steps": spec.steps, "rounds": rounds}
                    rows.append(row)
                    say(f"[{backend}] {mode:9s} {clients:2d} clients: {row['rps']:.2f} req/s, p50 {row['p50_ms']} ms, "
                        f"p95 {row['p95_ms']} ms, mean batch {mean_batch}, {a['codes']}")
            if "unbatched" in images:
                same[backend] = determinism(images)
                say(f"[{backend}] same request alone vs batched: {same[backend]}")
    return {"rows": rows, "ratios": ratios(rows), "determinism": same,
            "seconds": round(time.perf_counter() - t_run, 1),
            "settings": {k: v for k, v in vars(spec).items() if k != "extra_args"},
            "machine": {"cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0))
                        if hasattr(os, "sched_getaffinity") else None}}


def ratios(rows: list[dict], base: str = "unbatched") -> dict:
    """Per backend, every mode against `base`: requests/s ratio per client count and p50 ratio at 1 client."""
    out: dict = {}
    for r in rows:
        if r["mode"] == base:
            continue
        b = next((x for x in rows if x["mode"] == base and x["backend"] == r["backend"]
                  and x["clients"] == r["clients"]), None)
        if b is None or not b["rps"]:
            continue
        d = out.setdefault(f"{r['backend']}: {r['mode']} / {base}", {})
        d[f"rps_{r['clients']}_clients"] = r["rps"] / b["rps"]
        if r["clients"] == 1 and r["p50_ms"] and b["p50_ms"]:
            d["p50_1_client"] = r["p50_ms"] / b["p50_ms"]
    return out


def markdown(res: dict) -> str:
    lines = ["| backend | mode | clients | requests/s | p50 ms | p95 ms | mean batch |",
             "|---|---|---|---|---|---|---|"]
    def num(v, fmt):
        return "" if v is None else format(v, fmt)
    for r in res["rows"]:
        lines.append(f"| {r['backend']} | {r['mode']} | {r['clients']} | {r['rps']:.2f} | {num(r['p50_ms'], '.0f')} | "
                     f"{num(r['p95_ms'], '.0f')} | {num(r['mean_batch'], '.2f')} |")
    lines.append("")
    for name, d in res["ratios"].items():
        parts = [f"{k} {v:.2f}x" for k, v in d.items()]
        lines.append(f"- {name}: " + ", ".join(parts))
    for backend, d in res.get("determinism", {}).items():
        lines.append(f"- {backend}, the same request alone vs batched: " + "; ".join(
            f"{mode}: " + ", ".join(f"{k} {v}" for k, v in v_.items()) for mode, v_ in d.items()))
    return "\n".join(lines)
