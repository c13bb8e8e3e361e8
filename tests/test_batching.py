"""Step-level batching (#13): the scheduler merges the engine calls of requests at different steps, and a request
gives the same image batched beside others as alone (all three modalities, IRECE on, mixed steps, guidance and
sizes); cancelled or failing requests leave the batch without disturbing the others; overload is still refused.

Images are compared to the request run alone (`Pipeline.generate`) with a bound of 1/255 per pixel: a batched
engine call may pick other kernels than a call of one request (float rounding in the last bits), so bit-identity
is not promised; each test prints the largest difference it saw.
"""
import threading
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch

from irece_runtime.calls import Call, drive, run_merged
from irece_runtime.irece import IreceConfig
from irece_runtime.pipeline import Request
from protos.irece.v1 import generation_pb2 as pb
from server.scheduler import Scheduler
from server.validation import irece_config, to_pipeline_request

from .conftest import MODEL, model_image, random_latent
from .test_server import (HeldPipe, embedding_req, png_bytes, requests_ended, start_server,  # noqa: F401 (fixture)
                          text_req, wait_until, gauge)
from server.client import tensor_to_wire

BOUND = 1  # uint8 levels: batched vs alone


class Recorder:
    """Wraps a backend: records the rows and timesteps of every UNet call (eps) and localizer call."""

    def __init__(self, backend):
        self.backend, self.calls, self.lock = backend, [], threading.Lock()

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def eps(self, model, sample, timestep, hidden):
        with self.lock:
            self.calls.append(("eps", model, sample.shape[0], torch.as_tensor(timestep).reshape(-1).tolist()))
        return self.backend.eps(model, sample, timestep, hidden)

    def concept_map(self, sample, timestep, hidden, token_weights):
        with self.lock:
            self.calls.append(("concept_map", None, sample.shape[0], torch.as_tensor(timestep).reshape(-1).tolist()))
        return self.backend.concept_map(sample, timestep, hidden, token_weights)


def uint8(png: bytes) -> np.ndarray:
    import io

    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)))


def mixed_requests(pipe, sizes: bool = True) -> list[pb.GenerateRequest]:
    """Every modality, IRECE on (the operator's "star", some with an extra concept and a stricter tau), different
    steps, guidance and seeds; with `sizes`, one request at half the native side (a group of its own)."""
    f = pipe.backend.vae_scale_factor
    star = png_bytes(model_image(pipe, "star", seed=3))
    latent = random_latent(pipe, seed=4)[0].numpy()
    reqs = [
        text_req("a red star on a black background", seed=1, steps=6, guidance=5.0),
        text_req("a blue circle", seed=2, steps=4, guidance=1.0),  # no guidance: one row per step
        pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=star, prompt=""),
                           params=pb.GenerationParams(seed=3, steps=5)),
        pb.GenerateRequest(inverted_latent=pb.InvertedLatent(latent=tensor_to_wire(latent),
                                                             invert_with=pb.INVERSION_MODEL_STANDARD),
                           params=pb.GenerationParams(seed=4, steps=4, guidance=7.5)),
    ]
    emb = embedding_req(pipe)
    emb.params.CopyFrom(pb.GenerationParams(seed=5, steps=5, guidance=7.5))
    reqs.append(emb)
    extra = text_req("a star and a circle", seed=6, steps=6)
    extra.suppress_concepts.append("circle")
    extra.irece.tau = 0.3
    reqs.append(extra)
    if sizes:
        reqs.append(text_req("a star", seed=7, steps=4, height=pipe.sample_size * f // 2,
                             width=pipe.sample_size * f // 2))
    return reqs


def alone(service, msg: pb.GenerateRequest):
    """The request run alone, as the unbatched server runs it."""
    req = to_pipeline_request(msg, service.limits)
    res = service.pipe.generate(req, irece_config(msg, service.operator, service.allowed))
    return res.uint8()[0], res.irece


def batched_vs_alone(s, pipe, reqs, recorder) -> float:
    """Send reqs at once to a server whose scheduler gathers them into one batch; compare with each alone."""
    futures = [s.stub.Generate.future(r, timeout=300) for r in reqs]
    responses = [f.result() for f in futures]
    worst = 0
    for msg, resp in zip(reqs, responses):
        img, report = alone(s.server.service, msg)
        diff = int(np.abs(uint8(resp.png).astype(int) - img.astype(int)).max())
        worst = max(worst, diff)
        assert diff <= BOUND, (msg.WhichOneof("input"), msg.params, diff)
        assert resp.irece.intervened == report.intervened
        assert resp.irece.mask_area == pytest.approx(report.mask_area, abs=1e-6)
        assert [c.concept for c in resp.irece.concepts] == [c.concept for c in report.concepts]
    eps = [c for c in recorder.calls if c[0] == "eps"]
    merged = [c for c in eps if len(set(c[3])) > 1]
    assert merged, "no UNet call carried requests at different timesteps"
    assert max(c[2] for c in eps) >= 6  # at least three guided requests (or more unguided) in one call
    assert any(c[0] == "concept_map" and c[2] > 2 for c in recorder.calls)  # IRECE's localizer batched too
    mean_eps = s.metric("irece_batch_size_sum", call="eps") / s.metric("irece_batch_size_count", call="eps")
    print(f"\n{len(reqs)} requests: max |batched - alone| = {worst}/255; {len(eps)} UNet calls, "
          f"{len(merged)} with mixed timesteps, {mean_eps:.2f} requests per UNet call")
    assert mean_eps > 1.5
    return worst


# -- the scheduler on its own: deterministic ticks ---------------------------------------------------------------
class Doubler:
    """A backend stand-in for scheduler unit tests: eps = 2x, and it fails on any sample holding -1. Its VAE decode
    holds the scheduler until `expect` requests wait in its inbox, so that they start in one tick."""

    def __init__(self, expect: int):
        self.rows: list[int] = []
        self.expect, self.sched = expect, None

    def eps(self, model, sample, timestep, hidden):
        self.rows.append(sample.shape[0])
        if (sample == -1).any():
            raise RuntimeError("bad row")
        return sample * 2

    def vae_decode(self, latents):
        deadline = time.monotonic() + 30
        while len(self.sched._inbox) < self.expect and time.monotonic() < deadline:
            time.sleep(0.002)
        return latents


def counting(n: int, value: float, steps: int = 3, log: list | None = None):
    """A machine of `steps` eps calls on an (n, 1) sample of `value`; returns the final sample."""
    x = torch.full((n, 1), value)
    for i in range(steps):
        x = yield Call("eps", (x, torch.zeros(n, 1)), torch.tensor(i), "erased")
        if log is not None:
            log.append(i)
    return x


def holder():
    yield Call("vae_decode", (torch.zeros(1, 1),))


def run_all(sched: Scheduler, machines, guards) -> list:
    """The machines in one batch: a holding request keeps the scheduler busy until all of them wait in its inbox."""
    sched.backend.sched = sched
    hold = threading.Thread(target=sched.run, args=(holder(), lambda: None))
    hold.start()
    wait_until(lambda: len(sched._active) == 1 and not sched._inbox, "the holding request to run")
    out = [None] * len(machines)

    def one(k):
        try:
            out[k] = sched.run(machines[k], guards[k])
        except Exception as exc:
            out[k] = exc
    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(machines))]
    for k, t in enumerate(threads):  # one after another: they join the scheduler in this order
        t.start()
        wait_until(lambda: len(sched._inbox) == k + 1, f"request {k} to wait in the scheduler's inbox")
    for t in threads:
        t.join(30)
    hold.join(30)
    return out


def test_scheduler_merges_calls_and_a_cancelled_request_leaves_at_once():
    backend = Doubler(expect=3)
    sched = Scheduler(backend, max_batch=8)
    stop_after, logs = 1, [[], [], []]

    def cancel_c():
        if len(logs[2]) > stop_after:
            raise RuntimeError("cancelled")
    out = run_all(sched, [counting(2, 1.0, log=logs[0]), counting(1, 3.0, log=logs[1]),
                          counting(2, 5.0, log=logs[2])], [lambda: None, lambda: None, cancel_c])
    assert torch.equal(out[0], torch.full((2, 1), 8.0)) and torch.equal(out[1], torch.full((1, 1), 24.0))
    assert isinstance(out[2], RuntimeError) and str(out[2]) == "cancelled"
    # ticks: all three merged (5 rows) until C was cancelled after its 2nd call, then A and B alone (3 rows)
    assert backend.rows == [5, 5, 3], backend.rows
    assert logs[2] == [0, 1]  # C's machine was never advanced again
    sched.close()


def test_scheduler_isolates_a_failing_call_and_respects_max_batch():
    backend = Doubler(expect=3)
    sched = Scheduler(backend, max_batch=1)  # eps: 2 rows per call at most
    out = run_all(sched, [counting(1, 1.0, steps=1), counting(1, -1.0, steps=1), counting(1, 2.0, steps=1)],
                  [lambda: None] * 3)
    assert torch.equal(out[0], torch.full((1, 1), 2.0)) and torch.equal(out[2], torch.full((1, 1), 4.0))
    assert isinstance(out[1], RuntimeError) and str(out[1]) == "bad row"
    # at most 2 rows per call (max_batch 1: a guided UNet call's rows): [A, B] merged and failed, each retried
    # alone (A's went on, B's failed again), then C in a chunk of its own
    assert backend.rows == [2, 1, 1, 1], backend.rows
    sched.close()


def test_run_merged_splits_rows_and_gives_per_row_timesteps(pipe):
    rec = Recorder(pipe.backend)
    g = torch.Generator().manual_seed(0)
    h = pipe.encode_prompt("a star")
    side, c = pipe.sample_size, pipe.backend.latent_channels
    calls = [Call("eps", (torch.randn(n, c, side, side, generator=g), h.expand(n, -1, -1)), torch.tensor(t),
                  "erased") for n, t in ((2, 801), (1, 41), (2, 501))]
    merged = run_merged(rec, calls)
    assert rec.calls == [("eps", "erased", 5, [801, 801, 41, 501, 501])]
    for call, out in zip(calls, merged):
        assert (out - call.run(pipe.backend)).abs().max() < 1e-4


# -- over gRPC: the batched server ---------------------------------------------------------------------------------
def test_batched_and_alone_give_the_same_image_per_seed_torch(pipe, start_server, monkeypatch):
    rec = Recorder(pipe.backend)
    monkeypatch.setattr(pipe, "backend", rec)
    reqs = mixed_requests(pipe)
    s = start_server(pipe, workers=len(reqs), queue_size=0, gather_ms=1000)  # all join the first tick
    batched_vs_alone(s, pipe, reqs, rec)


def test_batched_and_alone_agree_with_the_gate_settling_early_and_keep_outside(pipe, start_server, monkeypatch):
    """The classifier gate at threshold 0 settles after its first t' (each request makes fewer calls), and
    keep_outside blends each inverted latent with its own inversion's trajectory: batched, every request is still
    what it is alone."""
    rec = Recorder(pipe.backend)
    monkeypatch.setattr(pipe, "backend", rec)
    reqs = mixed_requests(pipe)
    s = start_server(pipe, workers=len(reqs), queue_size=0, gather_ms=1000, gate="classifier", threshold=0.0,
                     keep_outside=True)
    service = s.server.service
    assert service.operator.keep_outside and service.operator.classifier_early_exit
    batched_vs_alone(s, pipe, reqs, rec)
    kept = service.operator
    for msg in (m for m in reqs if m.WhichOneof("input") == "inverted_latent"):  # what was served keeps outside
        service.operator = replace(kept, keep_outside=False)
        plain, _ = alone(service, msg)
        service.operator = kept
        assert not np.array_equal(alone(service, msg)[0], plain)


def test_batched_and_alone_give_the_same_image_per_seed_onnx_runtime(engine_dir, erased_dir, start_server):
    from irece_runtime.loading import load_pipeline
    ort_pipe = load_pipeline(MODEL, erased_dir, "onnx", engine_dir)
    rec = Recorder(ort_pipe.backend)
    ort_pipe.backend = rec
    reqs = mixed_requests(ort_pipe, sizes=False)  # the graphs' spatial size is fixed per folder
    s = start_server(ort_pipe, workers=len(reqs), queue_size=0, gather_ms=1000)
    batched_vs_alone(s, ort_pipe, reqs, rec)


def test_a_cancelled_request_leaves_the_batch_without_disturbing_the_others(pipe, start_server, monkeypatch):
    rec = Recorder(pipe.backend)
    monkeypatch.setattr(pipe, "backend", rec)
    s = start_server(pipe, workers=3, queue_size=0, gather_ms=1000)
    keep = [text_req("a red star", seed=11, steps=12), text_req("a moon", seed=12, steps=10, guidance=7.5)]
    victim = s.stub.Generate.future(text_req("a star", seed=13, steps=40), timeout=300)
    futures = [s.stub.Generate.future(r, timeout=300) for r in keep]
    # the victim is generating beside the others (their three guidance pairs in one UNet call): cancel it mid-way
    wait_until(lambda: sum(c[0] == "eps" and c[2] == 6 for c in list(rec.calls)) >= 3, "3 UNet calls of all three")
    victim.cancel()
    results = [f.result() for f in futures]
    assert victim.cancelled()
    wait_until(lambda: requests_ended(s, "CANCELLED") == 1 and gauge(s, "irece_inflight_requests") == 0,
               "the cancelled request to be counted and every request to leave")
    for msg, resp in zip(keep, results):
        img, _ = alone(s.server.service, msg)
        assert np.abs(uint8(resp.png).astype(int) - img.astype(int)).max() <= BOUND
    # the victim's rows went into merged calls with the others, and stopped: the last UNet calls carry only theirs
    eps = [c for c in rec.calls if c[0] == "eps"]
    assert max(c[2] for c in eps) == 6 and eps[-1][2] <= 2
    assert sum(c[2] == 6 for c in eps) < 12  # the victim (40 steps) left long before its end


def test_bad_input_in_a_batch_fails_alone(pipe, start_server):
    """A latent that overflows inside the UNet (range checks off): IRECE refuses it (non-finite at t*), and the
    requests batched beside it get their own images."""
    import math
    from dataclasses import replace
    s = start_server(pipe, workers=3, queue_size=0, gather_ms=1000)
    s.server.service.limits = replace(s.server.service.limits, max_latent_abs=math.inf)
    bad = pb.GenerateRequest(inverted_latent=pb.InvertedLatent(
        latent=tensor_to_wire(random_latent(pipe)[0].numpy() * 1e20)), params=pb.GenerationParams(steps=4))
    good = [text_req("a red star", seed=21, steps=4), text_req("a heart", seed=22, steps=5)]
    futures = [s.stub.Generate.future(r, timeout=300) for r in [bad] + good]
    err = futures[0].exception()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in err.details()
    for msg, f in zip(good, futures[1:]):
        img, _ = alone(s.server.service, msg)
        assert np.abs(uint8(f.result().png).astype(int) - img.astype(int)).max() <= BOUND
    assert requests_ended(s, "INTERNAL", "inverted_latent") == 0


def test_batched_overload_is_resource_exhausted(pipe, start_server):
    held = HeldPipe(pipe)
    s = start_server(held, workers=3, queue_size=2, max_batch=3)
    futures = [s.stub.Generate.future(text_req(seed=n, steps=2)) for n in range(9)]
    wait_until(lambda: (requests_ended(s, "RESOURCE_EXHAUSTED") == 4 and gauge(s, "irece_inflight_requests") == 3
                        and gauge(s, "irece_queue_depth") == 2), "3 generating, 2 queued, 4 refused")
    held.release.set()
    codes = sorted("OK" if f.exception() is None else f.exception().code().name for f in futures)
    assert codes == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"] * 4
    assert gauge(s, "irece_inflight_requests") == 0 and gauge(s, "irece_queue_depth") == 0


def test_unbatched_server_gives_the_same_image(pipe, start_server):
    s = start_server(pipe, batching=False)
    assert s.server.service.scheduler is None
    msg = text_req("a red star on a black background", seed=31, steps=5)
    img, _ = alone(s.server.service, msg)
    assert np.array_equal(uint8(s.stub.Generate(msg).png), img)  # one loop, driven alone: bit-identical


def test_serving_settings_that_cannot_work_refuse_to_start(capsys):
    from irece_cli.main import main
    from server.config import ServerConfig
    for field, value in (("max_batch", 0), ("gather_ms", -1.0), ("workers", 0)):
        with pytest.raises(ValueError, match=field):
            ServerConfig(**{field: value}).check_serving()
    assert main(["serve", "--port", "0", "--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err
