"""The Generation servicer: admission control, cancellation between engine steps, IRECE policy, metrics."""
from __future__ import annotations

import io
import json
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

from irece_runtime.irece import IreceConfig
from irece_runtime.loading import load_pipeline
from irece_runtime.pipeline import Pipeline, Request
from protos.irece.v1 import generation_pb2 as pb
from protos.irece.v1 import generation_pb2_grpc as pb_grpc

from . import report
from .config import ServerConfig
from .metrics import Metrics
from .validation import Limits, RequestError, irece_config, to_pipeline_request


class Aborted(Exception):
    """Raised from the step callback: the client cancelled or the deadline passed."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Admission:
    """workers generating + queue_size waiting; past that, RESOURCE_EXHAUSTED at once."""

    def __init__(self, workers: int, queue_size: int, metrics: Metrics):
        self.capacity = workers + queue_size
        self.slots = threading.BoundedSemaphore(workers)
        self.lock = threading.Lock()
        self.admitted = 0
        self.metrics = metrics

    @contextmanager
    def enter(self, alive):
        with self.lock:
            if self.admitted >= self.capacity:
                raise Aborted(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server busy: {self.admitted} requests admitted, capacity {self.capacity}")
            self.admitted += 1
        self.metrics.queue_depth.inc()
        queued = True
        try:
            while not self.slots.acquire(timeout=0.05):
                alive()  # a cancelled or expired request leaves the queue at once
            self.metrics.queue_depth.dec()
            queued = False
            self.metrics.inflight.inc()
            try:
                yield
            finally:
                self.metrics.inflight.dec()
                self.slots.release()
        finally:
            if queued:
                self.metrics.queue_depth.dec()
            with self.lock:
                self.admitted -= 1


def concept_catalogue(cfg: ServerConfig) -> set[str]:
    if cfg.allowed_concepts is not None:
        return set(cfg.allowed_concepts) | set(cfg.concepts)
    listed = Path(cfg.model) / "concepts.json"  # a model folder may list the concepts it knows
    known = set(json.loads(listed.read_text())) if listed.exists() else set()
    return known | set(cfg.concepts)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, cfg: ServerConfig, metrics: Metrics, pipe: Pipeline | None = None):
        self.cfg = cfg
        self.metrics = metrics
        self.pipe = pipe or load_pipeline(cfg.model, cfg.erased, cfg.backend, cfg.graphs, device=cfg.device,
                                          layers=tuple(cfg.localizer_layers) if cfg.localizer_layers else None)
        e = self.pipe.backend
        self.limits = Limits(embed_dim=e.embed_dim, latent_channels=e.latent_channels,
                             vae_scale_factor=e.vae_scale_factor,
                             default_side=self.pipe.sample_size * e.vae_scale_factor,
                             default_steps=cfg.default_steps, max_steps=cfg.max_steps,
                             default_guidance=cfg.default_guidance, max_side=cfg.max_side,
                             max_image_bytes=cfg.max_image_bytes, max_image_pixels=cfg.max_image_pixels,
                             backend=e.limits)
        self.operator = IreceConfig(concepts=tuple(cfg.concepts), tau=cfg.tau, t_star=cfg.t_star, mode=cfg.mode,
                                    template=cfg.template, min_peak=cfg.min_peak, per_concept=cfg.per_concept,
                                    gate=cfg.gate, threshold=cfg.threshold, vocabulary=tuple(cfg.vocabulary))
        self.allowed = concept_catalogue(cfg)
        self.admission = Admission(cfg.workers, cfg.queue_size, metrics)

    def warm_up(self) -> None:
        """One small generation through every engine the service uses (and the localizer's prompt cache)."""
        cfg = self.operator if self.operator.concepts else None
        self.pipe.generate(Request(prompt="warm up", steps=2), cfg)

    # -- handlers ----------------------------------------------------------------------------------------------
    def Generate(self, request, context):
        result = None
        for event in self._run(request, context, progress=False):
            result = event
        return result.result

    def GenerateStream(self, request, context):
        yield from self._run(request, context, progress=True)

    # -- the one path every request takes ------------------------------------------------------------------
    def _run(self, request, context, progress: bool):
        t_arrive = time.perf_counter()
        modality = {"text": "text", "embedding": "embedding", "inverted_latent": "inverted_latent"}.get(
            request.WhichOneof("input") or "", "none")
        try:
            req = to_pipeline_request(request, self.limits)
            cfg = irece_config(request, self.operator, self.allowed)
        except RequestError as exc:
            self._finish(modality, exc.code, t_arrive)
            context.abort(exc.code, str(exc))

        def alive():
            remaining = context.time_remaining()  # first: an expired call is also no longer active
            if remaining is not None and remaining <= 0:
                raise Aborted(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            if not context.is_active():
                raise Aborted(grpc.StatusCode.CANCELLED, "client cancelled")

        events: queue.Queue = queue.Queue()

        def callback(stage, step, total):
            alive()
            if progress:
                events.put(pb.GenerateEvent(progress=pb.Progress(stage=stage, step=step, total_steps=total)))

        outcome: dict = {}

        def work():
            try:
                with self.admission.enter(alive):
                    t_start = time.perf_counter()
                    res = self.pipe.generate(req, cfg, callback)
                    res.timings["queue"] = t_start - t_arrive
                    outcome["result"] = res
            except Aborted as exc:
                outcome["error"] = exc
            except ValueError as exc:  # input the pipeline rejects (e.g. a placeholder past the 77-token limit)
                outcome["error"] = Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"input: {exc}")
            except Exception as exc:  # an engine failure fails this request only
                outcome["error"] = Aborted(grpc.StatusCode.INTERNAL, f"generation failed: {type(exc).__name__}: {exc}")
            finally:
                events.put(None)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while (event := events.get()) is not None:
            yield event
        worker.join()
        if "error" in outcome:
            err = outcome["error"]
            self._finish(modality, err.code, t_arrive)
            context.abort(err.code, str(err))
        res = outcome["result"]
        if res.irece is not None:
            self.metrics.observe_irece(res.irece)
        self.metrics.observe_timings(res.timings)
        if torch.cuda.is_available():
            self.metrics.gpu_memory.set(torch.cuda.memory_allocated())
        self._finish(modality, grpc.StatusCode.OK, t_arrive)
        yield pb.GenerateEvent(result=self._response(req, res))

    def _finish(self, modality: str, code: grpc.StatusCode, t_arrive: float) -> None:
        self.metrics.requests.labels(modality, code.name).inc()
        if code == grpc.StatusCode.OK:
            self.metrics.request_seconds.labels(modality).observe(time.perf_counter() - t_arrive)

    @staticmethod
    def _response(req: Request, res) -> pb.GenerateResponse:
        return pb.GenerateResponse(png=png_bytes(res.uint8()[0]), seed=req.seed, modality=req.modality,
                                   timings_s=res.timings, irece=report.to_proto(res.irece),
                                   finish_reason=pb.FINISH_REASON_COMPLETED)
