"""The Generation servicer: admission control, bounded work per request, IRECE policy, metrics.

Every request takes one path: cheap validation in the handler thread (image headers, the work budget), admission
(a worker slot or a place in the queue, else RESOURCE_EXHAUSTED), then, in a worker thread, the image decode and
the generation. Generation is the pipeline's state machine for the request (`Pipeline.machine`): with batching on
(the default) it joins the one `Scheduler`, which runs the engine calls of every generating request together, step
by step (`server/scheduler.py`); with batching off the worker thread runs it alone (`Pipeline.generate`). A
`Guard` ends the request early - client cancelled or past its deadline, the server's time limit, a drain - checked
between engine steps, before every UNet/VAE block (torch backend), and by the handler while it waits, so a worker
stuck inside one engine call cannot keep its client waiting.
"""
from __future__ import annotations

import io
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

from irece_runtime import checkpoints, gates
from irece_runtime.irece import IreceConfig, NonFiniteError, off_schedule_warning
from irece_runtime.loading import load_pipeline
from irece_runtime.pipeline import Pipeline, Request
from protos.irece.v1 import generation_pb2 as pb
from protos.irece.v1 import generation_pb2_grpc as pb_grpc

from . import report
from .config import ServerConfig
from .metrics import Metrics
from .scheduler import Scheduler
from .validation import Limits, RequestError, invalid, irece_config, parse_request

log = logging.getLogger("irece.server")
POLL_SECONDS = 0.1  # how often a waiting handler looks at its request's guard
# a call that ends this close to its deadline ended by the deadline (the client's timer fires first); an explicit
# cancel inside this window is counted DEADLINE_EXCEEDED too
DEADLINE_SLACK_SECONDS = 0.2


class Aborted(Exception):
    """The request ends early with this status (raised by the guard, or by admission)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Admission:
    """workers generating + queue_size waiting; past that, RESOURCE_EXHAUSTED at once. Waiting requests take a free
    worker slot in their order of arrival (a FIFO of tickets under one condition), in both serving modes."""

    def __init__(self, workers: int, queue_size: int, metrics: Metrics):
        self.workers, self.capacity = workers, workers + queue_size
        self.cv = threading.Condition()
        self.waiting: deque[object] = deque()  # tickets of the admitted requests not yet generating, oldest first
        self.busy = 0
        self.metrics = metrics

    @contextmanager
    def enter(self, guard):
        guard()  # a draining server admits nothing, even with a slot free
        ticket = object()
        with self.cv:
            if self.busy + len(self.waiting) >= self.capacity:
                raise Aborted(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: retry later")
            self.waiting.append(ticket)
        self.metrics.queue_depth.inc()
        try:
            while True:
                with self.cv:
                    if self.waiting[0] is ticket and self.busy < self.workers:
                        self.waiting.popleft()
                        self.busy += 1
                        self.cv.notify_all()  # the next in line may find a slot free too
                        break
                    self.cv.wait(POLL_SECONDS / 2)
                guard()  # a cancelled or expired request, or any during a drain, leaves the queue at once
        except BaseException:
            with self.cv:
                self.waiting.remove(ticket)
                self.cv.notify_all()
            self.metrics.queue_depth.dec()
            raise
        self.metrics.queue_depth.dec()
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self.metrics.inflight.dec()
            with self.cv:
                self.busy -= 1
                self.cv.notify_all()


class Guard:
    """Everything that ends one request early; raises Aborted. `started` is set when the request takes a worker
    slot: queued requests are refused at once by a drain, running ones get until the drain's deadline, and the
    time limit counts generation time only."""

    def __init__(self, service: "GenerationService", context):
        self.service, self.context = service, context
        self.started: float | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        svc = self.service
        if svc.draining.is_set() and (self.started is None or now >= svc.drain_deadline):
            raise Aborted(grpc.StatusCode.UNAVAILABLE, "server shutting down: retry on another instance")
        if self.started is not None and now - self.started > svc.cfg.max_request_seconds:
            raise Aborted(grpc.StatusCode.DEADLINE_EXCEEDED, "request ran past the server's time limit")
        remaining = self.context.time_remaining()  # first: an expired call is also no longer active
        if remaining is not None and remaining <= 0:
            raise Aborted(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if not self.context.is_active():
            # the client's own timer ends its call a little before the server's clock reaches the deadline (the
            # deadline travels as a timeout and arrives late by the transit time): that client saw DEADLINE_EXCEEDED
            if remaining is not None and remaining <= DEADLINE_SLACK_SECONDS:
                raise Aborted(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            raise Aborted(grpc.StatusCode.CANCELLED, "client cancelled")


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
        if pipe is None and cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.pipe = pipe or load_pipeline(cfg.model, cfg.erased, cfg.backend, cfg.graphs, device=cfg.device,
                                          layers=tuple(cfg.localizer_layers) if cfg.localizer_layers else None,
                                          threads=cfg.threads)
        e = self.pipe.backend
        native = self.pipe.sample_size * e.vae_scale_factor  # the model's own image side, in pixels
        self.limits = Limits(embed_dim=e.embed_dim, latent_channels=e.latent_channels,
                             vae_scale_factor=e.vae_scale_factor, default_side=native,
                             default_steps=cfg.default_steps, max_steps=cfg.max_steps,
                             default_guidance=cfg.default_guidance, max_side=cfg.max_side or 2 * native,
                             max_image_bytes=cfg.max_image_bytes, max_image_pixels=cfg.max_image_pixels,
                             cost_budget=cfg.cost_budget if cfg.cost_budget is not None else 2 * cfg.max_steps,
                             backend=e.limits)
        self.operator = cfg.irece_config()
        self.allowed = concept_catalogue(cfg)
        gates.check(self.pipe, self.operator)  # a gate that cannot tell presence refuses to start, naming the fix
        if self.operator.gate == "head":  # the head gates only the concepts it was trained on
            self.allowed &= set(self.pipe.head_concepts)
            warning = off_schedule_warning(self.operator, self.pipe.head_trained_at, cfg.default_steps)
            if warning:
                log.warning("%s (BENCHMARKS.md)", warning)
        cfg.check_serving()
        # images per engine call: the operator's limit, within what the backend can run (TensorRT's profile)
        self.max_batch = min(cfg.max_batch, e.limits.max_batch or cfg.max_batch)
        self.scheduler = Scheduler(e, self.max_batch, cfg.gather_ms / 1000, metrics) if cfg.batching else None
        workers = cfg.workers if cfg.workers is not None else (self.max_batch if cfg.batching else 1)
        self.admission = Admission(workers, cfg.queue_size, metrics)
        metrics.workers.set(workers)
        metrics.queue_size.set(cfg.queue_size)
        metrics.initialise(concepts=sorted(self.allowed), histogram_concepts=self.operator.concepts)
        self.decodes = threading.BoundedSemaphore(cfg.max_decodes)
        self.draining = threading.Event()
        self.drain_deadline = math.inf
        self.running = 0  # worker threads alive (a stuck one outlives its request's answer)
        self._running_lock = threading.Lock()

    def warm_up(self) -> None:
        """One small generation through every engine the service uses (and the localizer's prompt cache)."""
        cfg = self.operator if self.operator.concepts else None
        self.pipe.generate(Request(prompt="warm up", steps=2), cfg)

    def close(self) -> None:
        """After the drain: the scheduler takes no more requests (its thread ends once the last one has left)."""
        if self.scheduler is not None:
            self.scheduler.close()

    def drain(self, grace: float) -> None:
        """Queued and new requests are refused from now on; running ones are aborted after `grace` seconds."""
        self.drain_deadline = min(self.drain_deadline, time.monotonic() + grace)
        self.draining.set()

    # -- handlers ----------------------------------------------------------------------------------------------
    def Generate(self, request, context):
        result = None
        for event in self._run(request, context, progress=False, method="Generate"):
            result = event
        return result.result

    def GenerateStream(self, request, context):
        yield from self._run(request, context, progress=True, method="GenerateStream")

    # -- the one path every request takes ------------------------------------------------------------------
    def _validate(self, request) -> tuple[Request, object, IreceConfig | None]:
        req, image = parse_request(request, self.limits)
        if req.learned:  # the pipeline would refuse it after admission; say which field, before
            try:
                self.pipe.token_ids(req.prompt, {k: int(v.shape[0]) for k, v in req.learned.items()})
            except ValueError:
                raise invalid("embedding.prompt", "a placeholder falls past the text encoder's 77-token limit")
        return req, image, irece_config(request, self.operator, self.allowed)

    def _run(self, request, context, progress: bool, method: str):
        t_arrive = time.perf_counter()
        rid = uuid.uuid4().hex[:12]
        modality = {"text": "text", "embedding": "embedding", "inverted_latent": "inverted_latent"}.get(
            request.WhichOneof("input") or "", "none")
        try:
            req, image, cfg = self._validate(request)
        except RequestError as exc:
            self._finish(modality, exc.code, method, t_arrive)
            context.abort(exc.code, str(exc))

        guard = Guard(self, context)
        events: queue.Queue = queue.Queue()

        def callback(stage, step, total):
            guard()
            if progress:
                events.put(pb.GenerateEvent(progress=pb.Progress(stage=stage, step=step, total_steps=total)))

        outcome: dict = {}

        def work():
            try:
                with self.admission.enter(guard):
                    guard.started = time.monotonic()
                    t_start = time.perf_counter()
                    if image is not None:  # decoded only now: a refused request never pays for it
                        with self.decodes:
                            req.init_image = image.decode(self.limits)
                    with checkpoints.checking(guard):
                        if self.scheduler is not None:  # joins the batch at the next tick
                            res = self.scheduler.run(self.pipe.machine(req, cfg, callback), guard)
                        else:
                            res = self.pipe.generate(req, cfg, callback)
                    res.timings["queue"] = t_start - t_arrive
                    outcome["result"] = res
            except Aborted as exc:
                outcome["error"] = exc
            except RequestError as exc:
                outcome["error"] = Aborted(exc.code, str(exc))
            except NonFiniteError as exc:  # IRECE fails closed (policy nonfinite="error")
                log.warning("request %s refused: %s", rid, exc)
                outcome["error"] = Aborted(grpc.StatusCode.INVALID_ARGUMENT,
                                           "input: IRECE cannot localize on non-finite values at t*; refused")
            except ValueError as exc:  # input the pipeline rejects that validation did not foresee
                log.warning("request %s rejected by the pipeline: %s", rid, exc)
                outcome["error"] = Aborted(grpc.StatusCode.INVALID_ARGUMENT,
                                           f"input: rejected by the pipeline (request id {rid})")
            except Exception:  # an engine failure fails this request only; details stay in the server log
                log.exception("request %s failed", rid)
                outcome["error"] = Aborted(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")
            finally:
                with self._running_lock:
                    self.running -= 1
                events.put(None)

        with self._running_lock:
            self.running += 1
        threading.Thread(target=work, daemon=True, name=f"irece-request-{rid}").start()
        error = None
        while True:
            try:
                event = events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                try:  # the worker may be stuck inside one engine call: answer the client anyway
                    guard()
                except Aborted as exc:
                    error = exc
                    break
                continue
            if event is None:
                error = outcome.get("error")
                break
            yield event
        if error is not None:
            self._finish(modality, error.code, method, t_arrive)
            context.abort(error.code, str(error))
        res = outcome["result"]
        if res.irece is not None:
            self.metrics.observe_irece(res.irece)
        self.metrics.observe_timings(res.timings)
        if self.metrics.gpu_memory is not None:
            self.metrics.gpu_memory.set(torch.cuda.memory_allocated())
        self._finish(modality, grpc.StatusCode.OK, method, t_arrive)
        yield pb.GenerateEvent(result=self._response(req, res))

    def _finish(self, modality: str, code: grpc.StatusCode, method: str, t_arrive: float) -> None:
        self.metrics.finished(modality, code.name, method, time.perf_counter() - t_arrive)

    def _response(self, req: Request, res) -> pb.GenerateResponse:
        return pb.GenerateResponse(png=png_bytes(res.uint8()[0]), seed=req.seed, modality=req.modality,
                                   timings_s=res.timings, irece=report.to_proto(res.irece, self.cfg.hide_scores),
                                   finish_reason=pb.FINISH_REASON_COMPLETED)
