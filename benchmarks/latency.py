"""`irece bench latency`: end-to-end latency, throughput and peak memory with IRECE off and on, per backend,
in one run (interleaved off/on after a warm-up, so drift hits both alike); then through the gRPC server."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from irece_runtime.irece import PRESENCE_GATE, RECHECK, IreceConfig
from irece_runtime.loading import load_pipeline
from irece_runtime.pipeline import Request
from miniworld.assets import MODEL_DIR as DEFAULT_MODEL


class PeakRSS:
    """Samples this process's resident set size in a thread; .peak_mb after the block."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak_mb = self.peak / 2 ** 20
        self.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None


def available_backends(graphs_dir: str | None) -> list[tuple[str, dict]]:
    out = [("torch", {})]
    if graphs_dir:
        out.append(("onnx", {"graphs_dir": graphs_dir}))
        if torch.cuda.is_available():
            out = [("torch-cuda", {"device": "cuda"})] + out
            import importlib.util
            if importlib.util.find_spec("tensorrt") and "tensorrt" in (Path(graphs_dir) / "manifest.json").read_text():
                out.append(("tensorrt", {"graphs_dir": graphs_dir}))
    return out


def _pipe(model_dir, erased, backend, kw):
    name = "torch" if backend.startswith("torch") else backend
    return load_pipeline(model_dir, erased, name, kw.get("graphs_dir"), device=kw.get("device", "cpu"))


def measure(model_dir: str = str(DEFAULT_MODEL), erased: str | None = None, graphs_dir: str | None = None,
            concept: str = "star", steps: int = 25, n: int = 10, warmup: int = 2, modality: str = "text",
            threshold: float | None = None, classifier_timesteps: tuple[int, ...] | None = None,
            shows: str | None = None, t_star: float | int | None = None,
            gate: str = PRESENCE_GATE, grow: int = 0, recheck: bool = False, negative_guidance: float = 0.0,
            negative_guidance_steps: int = 0, policy: str | None = None) -> dict:
    """p50/p95, throughput and peak memory with IRECE off, as the paper runs it ("paper": always intervening) and
    behind the presence gate ("gated"; "gated-every-t": scoring every t' even where the first settles the
    decision), interleaved per request; ratios on/off and gated/paper per backend. The requests show `concept`
    (IRECE's target), or `shows` (another concept: benign traffic, which the gate lets through). `grow`: the gated
    setting's mask growth; `recheck`: also the gate with the later looks (RECHECK, "gated+recheck");
    `negative_guidance`: also that (or the gate) with re-noised regions steered away from the concept ("+neg"),
    and with `negative_guidance_steps` K, also steering only K steps after each re-noising ("+negK")."""
    from miniworld.shapes import render
    d = IreceConfig.defaults()
    t_star = d.t_star if t_star is None else t_star
    gated = IreceConfig(concepts=(concept,), t_star=t_star, gate=gate,
                        threshold=d.threshold if threshold is None else threshold,
                        classifier_timesteps=tuple(classifier_timesteps or d.classifier_timesteps),
                        grow=grow)
    settings = {"off": None, "paper": IreceConfig(concepts=(concept,), t_star=t_star), "gated": gated}
    if recheck:
        settings["gated+recheck"] = replace(gated, recheck=RECHECK)
    if negative_guidance:
        last = "gated+recheck" if recheck else "gated"
        settings[last + "+neg"] = replace(settings[last], negative_guidance=negative_guidance)
        if negative_guidance_steps:
            settings[f"{last}+neg{negative_guidance_steps}"] = replace(
                settings[last + "+neg"], negative_guidance_steps=negative_guidance_steps)
    if policy:  # the named policy exactly as the server runs it (its numbers from the model's calibration block)
        from irece_runtime.policy import resolve
        settings[f"policy:{policy}"] = resolve(policy, model_dir, [concept])
    if gate == "classifier":  # the early exit is the classifier's: its cost without it, in the same run
        settings["gated-every-t"] = replace(gated, classifier_early_exit=False)
    cfg = settings["paper"]
    rows, overhead = [], {}
    shown = shows or concept
    learned = None
    if modality == "embedding":  # a learned embedding of the shown concept (textual inversion on the standard model)
        from . import attacks, crr
        learned = {"<c>": crr.ti_embedding(load_pipeline(model_dir), model_dir, None, "standard", shown,
                                           crr.BenchSettings(n=16))}
        template = attacks.TI_TEMPLATES[0].format("<c>")
    req_of = {"text": lambda s: Request(prompt=f"a red {shown} on a black background", steps=steps, seed=s),
              "embedding": lambda s: Request(prompt=template, learned=learned, steps=steps, seed=s),
              "inverted_latent": lambda s: Request(init_image=render(shown, seed=s).image, steps=steps, seed=s)}
    for backend, kw in available_backends(graphs_dir):
        pipe = _pipe(model_dir, erased, backend, kw)
        for s in range(warmup):
            for c in settings.values():
                pipe.generate(req_of[modality](s), c)
        lat = {k: [] for k in settings}
        stage = {k: [] for k in settings}
        peaks = {}
        for k, c in settings.items():
            with PeakRSS() as mem:  # memory per setting (its own pass), latency interleaved below
                pipe.generate(req_of[modality](0), c)
            peaks[k] = mem
        order = list(settings)
        for s in range(n):
            for k in (order if s % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                res = pipe.generate(req_of[modality](s), settings[k])
                lat[k].append(time.perf_counter() - t0)
                stage[k].append(res.timings)
        # the floor: one localizer pass against the UNet calls of a request (CFG: `steps` calls at batch 2)
        e = pipe.backend
        x = torch.randn(1, e.latent_channels, pipe.sample_size, pipe.sample_size).to(e.device)
        h, w = pipe.localization(concept, cfg.template)
        t = torch.tensor(500)
        unet_t, loc_t = [], []
        for _ in range(max(5, n)):
            t0 = time.perf_counter()
            e.eps("erased", torch.cat([x, x]), t, torch.cat([h, h]))
            unet_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            e.concept_map(x, t, h, w)
            loc_t.append(time.perf_counter() - t0)
        floor = np.median(loc_t) / (steps * np.median(unet_t))
        for k in settings:
            ms = np.array(lat[k]) * 1000
            rows.append({"backend": backend, "irece": k, "modality": modality, "shows": shown, "steps": steps,
                         "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                         "throughput_rps": float(1000 / ms.mean()), "peak_mem_mb": peaks[k].peak_mb,
                         "gpu_peak_mem_mb": peaks[k].gpu_peak_mb, "n": n})
        p50 = {r["irece"]: r["p50_ms"] for r in rows[-len(settings):]}
        overhead[backend] = {"p50_ratio_on_off": p50["paper"] / p50["off"],
                             "p50_ratio_gated_off": p50["gated"] / p50["off"],
                             "p50_ratio_gated_paper": p50["gated"] / p50["paper"],
                             **({"p50_ratio_gated_every_t_paper": p50["gated-every-t"] / p50["paper"]}
                                if "gated-every-t" in p50 else {}),
                             **({"p50_ratio_gated_recheck_paper": p50["gated+recheck"] / p50["paper"]}
                                if "gated+recheck" in p50 else {}),
                             **{f"p50_ratio_{k.replace('+', '_').replace('-', '_')}_paper": p50[k] / p50["paper"]
                                for k in p50 if "+neg" in k},
                             **{f"p50_ratio_{k.replace('policy:', 'policy_')}_off": p50[k] / p50["off"]
                                for k in p50 if k.startswith("policy:")},
                             "localizer_over_unet_step": float(np.median(loc_t) / np.median(unet_t)),
                             "floor_ratio": float(1 + floor),
                             "localization_share_of_request": float(np.mean(
                                 [st.get("localization", 0) / sum(st.values()) for st in stage["paper"]]))}
    gated = settings["gated"]
    return {"rows": rows, "overhead": overhead, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "gated": {"gate": gated.gate, "threshold": gated.threshold, "shows": shown, "target": concept,
                      "t_star": t_star,
                      "classifier_timesteps": list(gated.classifier_timesteps),
                      "grow": grow, "recheck": recheck,
                      "negative_guidance": negative_guidance, "negative_guidance_steps": negative_guidance_steps}}


def measure_server(model_dir: str = str(DEFAULT_MODEL), erased: str | None = None, concept: str = "star",
                   clients=(1, 4, 8), per_client: int = 4, steps: int = 25, backend: str = "torch",
                   graphs_dir: str | None = None, workers: int = 2) -> list[dict]:
    """Latency and throughput through the gRPC server on loopback at several concurrent clients."""
    import grpc
    from protos.irece.v1 import generation_pb2 as pb
    from protos.irece.v1 import generation_pb2_grpc as pb_grpc
    from server.app import Server
    from server.config import ServerConfig
    rows = []
    for irece_on in (False, True):
        cfg = ServerConfig(model=model_dir, erased=erased, backend=backend, graphs=graphs_dir,
                           concepts=[concept] if irece_on else [], port=0, metrics_port=None, workers=workers,
                           batching=False,  # the thread-per-request server; batched vs not: `irece bench serve`
                           queue_size=max(clients) * per_client, default_steps=steps)
        server = Server(cfg).start()
        try:
            for c in clients:
                with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                    stub = pb_grpc.GenerationStub(ch)
                    lat = []
                    lock = threading.Lock()

                    def client(k):
                        for j in range(per_client):
                            t0 = time.perf_counter()
                            stub.Generate(pb.GenerateRequest(text=pb.TextPrompt(prompt=f"a {concept}"),
                                                             params=pb.GenerationParams(seed=k * 100 + j)))
                            with lock:
                                lat.append(time.perf_counter() - t0)

                    t0 = time.perf_counter()
                    threads = [threading.Thread(target=client, args=(k,)) for k in range(c)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    wall = time.perf_counter() - t0
                ms = np.array(lat) * 1000
                rows.append({"backend": backend, "irece": irece_on, "clients": c, "requests": len(lat),
                             "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                             "throughput_rps": len(lat) / wall})
        finally:
            server.stop(0)
    return rows
