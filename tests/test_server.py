"""The gRPC service end to end over loopback: modalities, bad input, backend limits, policy, overload, cancellation,
seeds; and the IRECE report's one conversion (runtime -> wire -> JSON). Hardening (#14): the work budget, time
limits inside one UNet pass, drain and SIGTERM (`irece serve` as a process), decoding after admission, TLS/auth
that cannot half-apply, fail-closed IRECE, errors without input or policy, auth metrics, and a fuzz campaign.

Image side, text width and latent shape come from the model under test (`IRECE_TEST_MODEL`). Waits are on observable
state (metrics, futures) with a deadline, never a fixed sleep; requests that must stay busy are held by `HeldPipe`.
"""
import io
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from PIL import Image

from irece_runtime.backends import BackendLimits
from irece_runtime.irece import ConceptReport, IreceReport
from irece_runtime.pipeline import Request
from protos.irece.v1 import generation_pb2 as pb
from protos.irece.v1 import generation_pb2_grpc as pb_grpc
from server import report
from server.app import Server
from server.client import tensor_to_wire
from server.config import ServerConfig, free_port
from server.metrics import Metrics
from server.service import GenerationService
from server.validation import RequestError, to_pipeline_request

from .conftest import MODEL, image_side, model_image, random_latent

STEPS = 4


# -- a server under test -------------------------------------------------------------------------------------
@dataclass
class Running:
    server: Server
    stub: pb_grpc.GenerationStub
    side: int  # the model's image side in pixels

    def decode(self, resp: pb.GenerateResponse, size: tuple[int, int] | None = None) -> np.ndarray:
        """The response's PNG, which must be an RGB image of the model's size (or `size`, (height, width))."""
        img = np.asarray(Image.open(io.BytesIO(resp.png)))
        assert img.shape == (*(size or (self.side, self.side)), 3)
        return img

    def metric(self, name: str, **labels) -> float:
        from prometheus_client.parser import text_string_to_metric_families
        port = self.server.metrics_server.server_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


@contextmanager
def running(pipe, **overrides):
    # the paper's policy: these tests are about serving, and it intervenes in every request (test_policy.py holds
    # the recommended one, the default)
    fields = dict(model=str(MODEL), concepts=["star"], policy="paper", port=0, metrics_port=0, workers=1, queue_size=2,
                  default_steps=STEPS)
    cfg = ServerConfig(**(fields | overrides))
    metrics = Metrics()
    server = Server(cfg, GenerationService(cfg, metrics, pipe), metrics).start(warm=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            yield Running(server, pb_grpc.GenerationStub(ch), image_side(pipe))
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def served(pipe):
    """One server for the tests that do not change its configuration."""
    with running(pipe) as s:
        yield s


@pytest.fixture
def start_server():
    """start_server(pipe, **config overrides) -> Running; every server started is stopped after the test."""
    with ExitStack() as stack:
        yield lambda pipe, **overrides: stack.enter_context(running(pipe, **overrides))


class HeldPipe:
    """The pipeline under test, except that every request waits before each step until `release` is set. While it
    waits the service's step callback keeps running, so cancellation and deadlines are noticed as usual: a request
    holds its slot exactly as long as the test wants, whatever the model's speed. Both ways the service runs a
    request are held: `generate` (batching off) and `machine` (the batched scheduler drives it)."""

    def __init__(self, pipe):
        self.pipe, self.release = pipe, threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def _held(self, callback):
        def held(stage, step, total):
            while not self.release.wait(0.01):
                callback(stage, step, total)
            callback(stage, step, total)
        return held

    def generate(self, req, cfg=None, callback=None):
        return self.pipe.generate(req, cfg, self._held(callback))

    def machine(self, req, cfg=None, callback=None):
        return self.pipe.machine(req, cfg, self._held(callback))


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


# -- requests --------------------------------------------------------------------------------------------------
def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def text_req(prompt="a red circle on a black background", seed=1, **params):
    return pb.GenerateRequest(text=pb.TextPrompt(prompt=prompt), params=pb.GenerationParams(seed=seed, **params))


def embedding_req(pipe, vec=None, token="<s>"):
    vec = pipe.encode_prompt("x")[0, 0:1].numpy() if vec is None else vec
    return pb.GenerateRequest(embedding=pb.EmbeddingPrompt(
        prompt=f"a {token} on a black background",
        embeddings=[pb.LearnedEmbedding(token=token, vectors=tensor_to_wire(vec))]))


def at_wire_precision(obj):
    """A report's JSON form with every float rounded to float32, what the wire carries (NaN stays NaN)."""
    if isinstance(obj, dict):
        return {k: at_wire_precision(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [at_wire_precision(v) for v in obj]
    return float(np.float32(obj)) if isinstance(obj, float) else obj


def same_json(a: dict, b: dict) -> bool:
    """Equal as JSON text: same keys in the same order, same values, NaN equal to NaN."""
    return json.dumps(a) == json.dumps(b)


# -- the report's one conversion -------------------------------------------------------------------------------
def test_report_runtime_to_wire_to_json_is_the_runtime_json():
    rep = IreceReport(step_index=3, timestep=681, mask=torch.tensor([[[0.0, 1.0], [1.0, 1.0]]]), concepts=[
        ConceptReport("star", mask_area=0.75, peak=0.123456789, intervened=True),  # no presence gate: NaN
        ConceptReport("circle", mask_area=0.0, peak=0.0317, intervened=False, score=0.4242, threshold=0.61)])
    wire = pb.IreceReport.FromString(report.to_proto(rep).SerializeToString())
    assert same_json(report.to_dict(wire), at_wire_precision(rep.to_dict()))
    assert wire.timestep == 681 and wire.mask_area == 0.75 and wire.intervened
    assert math.isnan(wire.concepts[0].score) and math.isnan(wire.concepts[0].threshold)
    assert wire.concepts[1].threshold == pytest.approx(0.61)
    # no concept to suppress: the empty report, the same one `irece generate --json` prints
    empty = pb.IreceReport.FromString(report.to_proto(None).SerializeToString())
    assert report.to_dict(empty) == IreceReport().to_dict()
    assert empty.step_index == -1 and not empty.intervened


def test_config_file_t_star_is_parsed_like_the_flag(tmp_path):
    (tmp_path / "a.toml").write_text('concepts = ["star"]\nt_star = "7"\n')
    (tmp_path / "b.json").write_text('{"t_star": "0.25"}')
    assert ServerConfig.load(tmp_path / "a.toml").t_star == 7 and ServerConfig.load(tmp_path / "b.json").t_star == 0.25
    (tmp_path / "c.toml").write_text('t_star = "soon"\n')
    with pytest.raises(ValueError, match="t_star"):
        ServerConfig.load(tmp_path / "c.toml")


def test_negative_guidance_in_the_config_reaches_irece_and_a_bad_one_refuses_to_start(pipe, tmp_path):
    (tmp_path / "n.toml").write_text(f'model = "{MODEL.as_posix()}"\nconcepts = ["star"]\nnegative_guidance = 3.0\n'
                                     'negative_guidance_steps = 6\n')
    cfg = ServerConfig.load(tmp_path / "n.toml")
    operator = GenerationService(cfg, Metrics(), pipe).operator
    assert (operator.negative_guidance, operator.negative_guidance_steps) == (3.0, 6)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="negative_guidance"):
            GenerationService(replace(cfg, negative_guidance=bad), Metrics(), pipe)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="negative_guidance_steps"):
            GenerationService(replace(cfg, negative_guidance_steps=bad), Metrics(), pipe)


def test_keep_others_in_the_config_reaches_irece_and_refuses_to_start_without_keep_outside_and_the_head(pipe, tmp_path):
    (tmp_path / "k.toml").write_text(f'model = "{MODEL.as_posix()}"\nconcepts = ["star"]\ngate = "head"\n'
                                     'keep_outside = true\nkeep_others = true\n')
    cfg = ServerConfig.load(tmp_path / "k.toml")
    assert GenerationService(cfg, Metrics(), pipe).operator.keep_others
    for bad in ({"keep_outside": False}, {"gate": "classifier"}):
        with pytest.raises(ValueError, match="keep_others"):
            GenerationService(replace(cfg, **bad), Metrics(), pipe)


# -- over gRPC -------------------------------------------------------------------------------------------------
def test_one_request_per_modality_and_metrics(served, pipe):
    s = served
    before = s.metric("irece_interventions_total", concept="star")
    r1 = s.stub.Generate(text_req())
    r2 = s.stub.Generate(embedding_req(pipe))
    r3 = s.stub.Generate(pb.GenerateRequest(inverted_latent=pb.InvertedLatent(
        image=png_bytes(model_image(pipe, "star")))))
    operator = s.server.service.operator
    for r, modality in ((r1, "text"), (r2, "embedding"), (r3, "inverted_latent")):
        s.decode(r)
        assert r.modality == modality and r.finish_reason == pb.FINISH_REASON_COMPLETED
        assert [c.concept for c in r.irece.concepts] == ["star"]
        assert r.irece.step_index == operator.step_index(STEPS) and r.irece.timestep > 0
        assert math.isnan(r.irece.concepts[0].score)  # the operator's IRECE has no presence gate
    # the erased concept's inverted latent: IRECE localizes it and masks a region
    assert r3.irece.intervened and 0 < r3.irece.mask_area < 1
    assert s.metric("irece_interventions_total", concept="star") >= before + 1
    assert s.metric("irece_requests_total", modality="inverted_latent", code="OK") >= 1
    assert s.metric("irece_localizations_total", concept="star") >= s.metric("irece_interventions_total", concept="star")
    assert s.metric("irece_stage_duration_seconds_count", stage="inversion") >= 1


def test_conditioning_defence_and_recheck_reach_the_wire_and_metrics(start_server, pipe):
    """conditioning = null with a recheck, at thresholds of 0 (the gate always fires, every conditioning counts as
    carrying the concept): the response says the image lost its conditioning, lists the concept once per check, and
    Prometheus counts the request once."""
    s = start_server(pipe, gate="classifier", threshold=0.0, conditioning="null", conditioning_threshold=0.0,
                     recheck=[0.8])
    assert s.server.service.operator.conditioning == "null" and s.server.service.operator.recheck == (0.8,)
    r = s.stub.Generate(text_req())
    s.decode(r)
    assert r.irece.unconditioned and report.to_dict(r.irece)["unconditioned"]
    assert [c.concept for c in r.irece.concepts] == ["star", "star"]  # t* and the recheck
    assert s.metric("irece_unconditioned_total") == 1
    assert s.metric("irece_localizations_total", concept="star") == 1  # one request, however many checks


def test_hide_scores_withholds_the_gates_numbers_from_clients(start_server, pipe):
    s = start_server(pipe, gate="classifier", threshold=0.0, t_star=2, hide_scores=True)
    r = s.stub.Generate(text_req())
    (c,) = r.irece.concepts
    assert math.isnan(c.score) and math.isnan(c.threshold) and math.isnan(c.peak)
    assert r.irece.intervened and c.intervened and c.mask_area > 0  # what happened is still reported
    assert s.metric("irece_presence_score_count", concept="star") == 1  # the operator still sees the score


def test_stream_reports_progress_then_result(served):
    events = list(served.stub.GenerateStream(text_req()))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress if p.stage == "denoising"] == list(range(STEPS))
    assert events[-1].HasField("result")
    served.decode(events[-1].result)


def test_health_serving_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{served.server.port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="irece.v1.Generation"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "irece.v1.Generation" in [s.name for s in resp.list_services_response.service]


BAD = [  # invalid for any SD v1.x model
    (pb.GenerateRequest(), "input"),
    (text_req(steps=1000), "params.steps"),
    (text_req(guidance=100.0), "params.guidance"),
    (text_req(guidance=float("nan")), "params.guidance"),
    (text_req(height=33), "params.height"),
    (text_req(width=33), "params.width"),
    (pb.GenerateRequest(text=pb.TextPrompt(prompt="x"), suppress_concepts=["dragon"]), "suppress_concepts[0]"),
    (pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=b"not an image")), "inverted_latent.image"),
    (pb.GenerateRequest(inverted_latent=pb.InvertedLatent()), "inverted_latent.source"),
    (pb.GenerateRequest(inverted_latent=pb.InvertedLatent(
        latent=pb.Tensor(dtype="float32", shape=[4, 3, 3], data=bytes(4 * 36)))), "inverted_latent.latent.shape"),
]


@pytest.mark.parametrize("request_, field", BAD, ids=[f for _, f in BAD])
def test_bad_input_is_invalid_argument_naming_the_field(served, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Generate(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)


def test_bad_embeddings(served, pipe):
    stub = served.stub
    d = pipe.backend.embed_dim
    cases = {
        "embedding.embeddings[0].vectors.shape": np.zeros((1, d + 1), np.float32),
        "embedding.embeddings[0].vectors.data": np.full((1, d), np.nan, np.float32),
    }
    for field, vec in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(embedding_req(pipe, vec))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)
    req = embedding_req(pipe)
    req.embedding.embeddings[0].vectors.dtype = "int64"
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req)
    assert err.value.details().startswith("embedding.embeddings[0].vectors.dtype")
    req = embedding_req(pipe)
    req.embedding.embeddings[0].vectors.data = b"\x00" * 7
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req)
    assert err.value.details().startswith("embedding.embeddings[0].vectors.data")


def test_backend_limits_refuse_what_the_backend_cannot_run(pipe, start_server, monkeypatch):
    """A backend whose graphs were built for one latent size: any other size is INVALID_ARGUMENT naming the field
    (not an INTERNAL engine failure), and a request that names no size gets the graphs' size."""
    f, lat = pipe.backend.vae_scale_factor, pipe.sample_size
    side, unit = lat * f, 2 * f  # unit: what sizes are multiples of on a backend without limits
    built = (side, 2 * side)  # pixels (height, width) of graphs built for a wide latent
    monkeypatch.setattr(pipe.backend, "limits", BackendLimits(None, (lat, 2 * lat)))
    s = start_server(pipe)
    cases = [("params.height", dict(height=side + unit)), ("params.width", dict(width=side)),
             ("params.width", dict(height=side, width=2 * side - unit))]
    unlimited = replace(s.server.service.limits, backend=BackendLimits())
    for field, params in cases:
        to_pipeline_request(text_req(**params), unlimited)  # a backend without limits would run it
        with pytest.raises(grpc.RpcError) as err:
            s.stub.Generate(text_req(steps=1, **params))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith(field)
    s.decode(s.stub.Generate(text_req(steps=1)), size=built)
    s.decode(s.stub.Generate(text_req(steps=1, height=built[0], width=built[1])), size=built)
    assert s.metric("irece_requests_total", modality="text", code="INTERNAL") == 0
    # batch: one image per request, refused by a backend that cannot take even that
    none = replace(s.server.service.limits, backend=BackendLimits(max_batch=0))
    with pytest.raises(RequestError) as err:
        to_pipeline_request(text_req(), none)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "params"


def test_oversized_image_and_message(pipe, start_server):
    s = start_server(pipe, max_image_bytes=50_000, max_message_bytes=200_000)
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(big, format="PNG")
    assert len(big.getvalue()) > 50_000
    with pytest.raises(grpc.RpcError) as err:
        s.stub.Generate(pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=big.getvalue())))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("inverted_latent.image")
    with pytest.raises(grpc.RpcError) as err:
        s.stub.Generate(pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=b"\x89PNG" + bytes(300_000))))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own max message size
    s.decode(s.stub.Generate(text_req()))  # still up


def test_client_cannot_disable_or_weaken_operator_concepts(pipe, start_server):
    stub = start_server(pipe, allowed_concepts=["circle"]).stub  # what requests may add (any model's catalogue)
    req = text_req()
    req.irece.disable = True
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "irece.disable" in err.value.details()
    req = text_req()
    req.irece.tau = 0.9
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "irece.tau" in err.value.details()
    req = text_req()
    req.irece.tau = 0.2  # stronger is fine
    req.suppress_concepts.append("circle")  # adding a concept is fine
    resp = stub.Generate(req)
    assert [c.concept for c in resp.irece.concepts] == ["star", "circle"]


def test_same_seed_same_image_alone_or_beside_others(pipe, start_server):
    s = start_server(pipe, workers=2, queue_size=4)
    alone = s.decode(s.stub.Generate(text_req(seed=42)))
    futures = [s.stub.Generate.future(text_req(seed=n)) for n in (42, 7, 42, 9)]
    results = [s.decode(f.result(timeout=120)) for f in futures]
    assert np.array_equal(results[0], alone) and np.array_equal(results[2], alone)
    assert not np.array_equal(results[1], alone)


def test_overload_excess_refused_accepted_complete(pipe, start_server):
    held = HeldPipe(pipe)
    s = start_server(held, workers=1, queue_size=1)
    futures = [s.stub.Generate.future(text_req(seed=n)) for n in range(6)]
    # nothing finishes while held: one request generates, one waits, the other four are refused at once
    wait_until(lambda: (s.metric("irece_requests_total", modality="text", code="RESOURCE_EXHAUSTED") == 4
                        and s.metric("irece_inflight_requests") == 1 and s.metric("irece_queue_depth") == 1),
               "1 request generating, 1 queued, 4 refused")
    held.release.set()
    outcomes = []
    for f in futures:
        try:
            s.decode(f.result(timeout=120))
            outcomes.append("OK")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)
    assert sorted(outcomes) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 4
    s.decode(s.stub.Generate(text_req()))  # capacity came back
    assert s.metric("irece_inflight_requests") == 0 and s.metric("irece_queue_depth") == 0


def test_cancel_and_deadline_free_capacity(pipe, start_server):
    held = HeldPipe(pipe)
    s = start_server(held, workers=1, queue_size=0)

    def ended(code: str) -> float:
        return s.metric("irece_requests_total", modality="text", code=code)

    slow = s.stub.Generate.future(text_req(seed=1))
    wait_until(lambda: s.metric("irece_inflight_requests") == 1, "the first request to take the only slot")
    with pytest.raises(grpc.RpcError) as err:
        s.stub.Generate(text_req(seed=2), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    slow.cancel()
    # the handler answers at once; the worker leaves at its next check (between two steps here)
    wait_until(lambda: ended("CANCELLED") == 1 and s.metric("irece_inflight_requests") == 0,
               "the cancelled request to be counted and to leave")
    with pytest.raises(grpc.RpcError) as err:  # held: it cannot finish before its deadline
        s.stub.Generate(text_req(seed=3), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: ended("DEADLINE_EXCEEDED") == 1 and s.metric("irece_inflight_requests") == 0,
               "the expired request to be counted as DEADLINE_EXCEEDED and to leave")
    assert ended("CANCELLED") == 1
    held.release.set()
    s.decode(s.stub.Generate(text_req(seed=4), timeout=60))


def test_bearer_auth_and_its_refusals_are_counted(pipe, start_server):
    s = start_server(pipe, auth_tokens=["s3cret"])
    for metadata in (None, [("authorization", "Bearer guess")], [("authorization", "s3cret")]):
        with pytest.raises(grpc.RpcError) as err:
            s.stub.Generate(text_req(steps=1), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        next(s.stub.GenerateStream(text_req(steps=1)))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # brute force shows: every refusal counted (the request is not parsed for an unknown caller)
    assert s.metric("irece_auth_failures_total") == 4
    assert s.metric("irece_requests_total", modality="unknown", code="UNAUTHENTICATED") == 4
    s.decode(s.stub.Generate(text_req(steps=1), metadata=[("authorization", "Bearer s3cret")]))
    assert s.metric("irece_auth_failures_total") == 4


# -- #14 bounded work per request: work budget, time limit, drain -----------------------------------------
def requests_ended(s: Running, code: str, modality: str = "text") -> float:
    """irece_requests_total read from the server's registry (also after its metrics endpoint has stopped)."""
    return s.server.metrics.registry.get_sample_value("irece_requests_total",
                                                       {"modality": modality, "code": code}) or 0.0


def gauge(s: Running, name: str) -> float:
    return s.server.metrics.registry.get_sample_value(name) or 0.0


def test_oversized_requests_are_refused_at_once(served, pipe, start_server):
    """A 1024x1024 request for a 32 px model used to be accepted and hold a worker for minutes inside one UNet
    pass. The default max side is twice the model's; past that, the work budget (pixels x steps x modality)
    still bounds what an operator allows."""
    side = served.side
    huge = 32 * side  # 1024 px for the 32 px mini world
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Generate(text_req(steps=1, height=huge, width=huge), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("params.height") and f"..{2 * side}" in err.value.details()
    refused_s = time.monotonic() - t0
    print(f"\n{huge}x{huge}: {err.value.code().name} in {refused_s * 1000:.1f} ms: {err.value.details()}")
    assert refused_s < 1.0
    limits = served.server.service.limits
    assert limits.max_side == 2 * side and limits.cost_budget == 2 * limits.max_steps
    # the budget's edge: at twice the native side (4 native images) max_steps / 2 steps fit, inverted half that
    edge = int(limits.cost_budget // 4)
    to_pipeline_request(text_req(steps=edge, height=2 * side, width=2 * side), limits)
    for req, field in ((text_req(steps=edge + 1, height=2 * side, width=2 * side), "params.steps"),
                       (pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=png_bytes(model_image(pipe))),
                                           params=pb.GenerationParams(steps=edge // 2 + 1, width=2 * side,
                                                                      height=2 * side)), "params.steps")):
        with pytest.raises(grpc.RpcError) as err:
            served.stub.Generate(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)
        assert "work budget" in err.value.details()
    # an operator who raises max_side still has the budget: huge x huge is over it even for one step
    s = start_server(pipe, max_side=huge)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        s.stub.Generate(text_req(steps=1, height=huge, width=huge), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("params.height") and "work budget" in err.value.details()
    refused_s = time.monotonic() - t0
    print(f"max_side={huge}: {err.value.code().name} in {refused_s * 1000:.1f} ms: {err.value.details()}")
    assert refused_s < 1.0


@contextmanager
def stuck_inside_unet(pipe):
    """The next UNet pass blocks inside the UNet (before its mid block) until `release` is set, reaching no stop
    point itself: one engine call that takes minutes. `state["completed"]` counts UNet passes that reach the
    output layer after that."""
    unet = pipe.backend.unets["erased"]
    entered, release = threading.Event(), threading.Event()
    state = {"armed": True, "completed": 0}

    def block(module, args):
        if state["armed"]:
            state["armed"] = False
            entered.set()
            release.wait(120)

    def completed(module, args, output):
        if entered.is_set():
            state["completed"] += 1

    hooks = [unet.mid_block.register_forward_pre_hook(block), unet.conv_out.register_forward_hook(completed)]
    try:
        yield entered, release, state
    finally:
        release.set()
        for h in hooks:
            h.remove()


def test_time_limit_answers_the_client_while_a_worker_is_stuck_in_a_unet_pass(pipe, start_server):
    limit = 0.5
    s = start_server(pipe, workers=1, queue_size=0, max_request_seconds=limit)
    with stuck_inside_unet(pipe) as (entered, release, state):
        future = s.stub.Generate.future(text_req(steps=2))  # no client deadline
        assert entered.wait(60)
        t_stuck = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            future.result(timeout=30)  # used to wait as long as the engine call took
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t_stuck < limit + 1.0
        # the worker is still inside the UNet: its slot stays taken, so the next request is refused, not queued
        assert gauge(s, "irece_inflight_requests") == 1
        with pytest.raises(grpc.RpcError) as err:
            s.stub.Generate(text_req(steps=1), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()  # the engine call returns: the worker stops at the next block, not at the next step
        wait_until(lambda: gauge(s, "irece_inflight_requests") == 0, "the stuck worker to free its slot", 10)
        assert state["completed"] == 0
    assert requests_ended(s, "DEADLINE_EXCEEDED") == 1
    s.decode(s.stub.Generate(text_req(steps=1)))


def test_request_at_the_budget_edge_ends_within_its_time_limit(pipe, start_server):
    """Real work, no stand-in: the largest request the default budget allows (twice the native side, max_steps/2
    steps; seconds on one CPU core) finishes or is aborted within the server's time limit, and frees its worker."""
    limit = 0.5
    s = start_server(pipe, workers=1, queue_size=0, max_request_seconds=limit)
    side, limits = 2 * s.side, s.server.service.limits
    req = text_req(steps=int(limits.cost_budget // 4), height=side, width=side)
    to_pipeline_request(req, limits)  # within the budget
    t0 = time.monotonic()
    try:
        s.decode(s.stub.Generate(req, timeout=120), size=(side, side))
        outcome = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        outcome = exc.code()
    elapsed = time.monotonic() - t0
    print(f"\nbudget edge {side}x{side}, {req.params.steps} steps, limit {limit} s: {outcome.name} after "
          f"{elapsed:.2f} s")
    assert outcome in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert elapsed < limit + 1.0, f"{elapsed:.2f} s for a {limit} s limit"
    wait_until(lambda: gauge(s, "irece_inflight_requests") == 0, "the worker to stop", 2)
    s.decode(s.stub.Generate(text_req(steps=1)))


def test_drain_refuses_queued_work_at_once_and_aborts_running_work_at_its_deadline(pipe, start_server):
    held = HeldPipe(pipe)  # never released: the running request would go on forever
    s = start_server(held, workers=1, queue_size=2)
    running_ = s.stub.Generate.future(text_req(seed=1))
    wait_until(lambda: gauge(s, "irece_inflight_requests") == 1, "one request running")
    queued = [s.stub.Generate.future(text_req(seed=n)) for n in (2, 3)]
    wait_until(lambda: gauge(s, "irece_queue_depth") == 2, "two requests queued")
    grace = 2.0
    t0 = time.monotonic()
    stopper = threading.Thread(target=s.server.stop, args=(grace,))
    stopper.start()
    for f in queued:  # refused at once, not started and cut off at the end of the drain
        assert f.exception(timeout=30).code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < grace / 2
    assert running_.exception(timeout=30).code() == grpc.StatusCode.UNAVAILABLE
    assert grace - 0.1 <= time.monotonic() - t0 < grace + 1.0
    stopper.join(30)
    assert not stopper.is_alive() and time.monotonic() - t0 < grace + 1.5
    assert requests_ended(s, "UNAVAILABLE") == 3 and requests_ended(s, "CANCELLED") == 0
    wait_until(lambda: gauge(s, "irece_inflight_requests") == 0, "the aborted worker to stop", 5)


ROOT = Path(__file__).resolve().parents[1]


def start_process(args: list[str]) -> tuple[subprocess.Popen, int, "queue.Queue[str]"]:
    """A server process; returns it, its gRPC port (read from its log) and its log lines as they come."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, f"server exited with {proc.returncode}"
            continue
        if m := re.search(r"serving \S+ on port (\d+)", line):
            return proc, int(m.group(1)), lines
    proc.kill()
    raise AssertionError("the server did not start within 120 s")


def test_sigterm_with_work_in_flight_ends_the_process_within_the_drain(pipe):
    """`irece serve` with a long request running (a 256x256 request the operator's budget allows: minutes on a
    CPU) and one queued: SIGTERM refuses the queued one at once, aborts the running one at the drain's end (both
    told UNAVAILABLE), and the process is gone within drain_seconds + 5 s."""
    drain, side = 1.0, 256  # 8x the mini world's side: minutes of work on one core (an SD model: 20 full steps)
    metrics_port = free_port()
    proc, port, _ = start_process(["-m", "irece_cli.main", "serve", "--model", str(MODEL), "--concept", "star",
                                   "--port", "0", "--metrics-port", str(metrics_port), "--workers", "1",
                                   "--queue-size", "1", "--max-side", str(side), "--cost-budget", "1e9",
                                   "--drain-seconds", str(drain)])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            stream = stub.GenerateStream(text_req(steps=20, height=side, width=side), timeout=300)
            assert next(stream).progress.step == 0  # running
            queued = stub.Generate.future(text_req(steps=1), timeout=300)
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            wait_until(lambda: "irece_queue_depth 1.0" in urllib.request.urlopen(url).read().decode(), "one queued")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert queued.exception(timeout=30).code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < drain
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        proc.wait(timeout=drain + 5)
        exit_s = time.monotonic() - t0
        print(f"\nSIGTERM -> process gone in {exit_s:.2f} s (drain_seconds {drain})")
        assert proc.returncode == 0 and exit_s < drain + 5
    finally:
        if proc.poll() is None:
            proc.kill()


STUCK_SERVER = """
import sys, threading
from types import SimpleNamespace
from irece_runtime.backends import BackendLimits
from server.app import serve
from server.config import ServerConfig
from server.metrics import Metrics
from server.service import GenerationService

class StuckPipe:  # a request that enters one engine call and never comes back, reaching no stop point
    backend = SimpleNamespace(embed_dim=8, latent_channels=4, vae_scale_factor=8, limits=BackendLimits())
    sample_size = 8

    def generate(self, req, cfg=None, callback=None):
        if req.prompt == "stuck":
            print("entered the engine call", file=sys.stderr, flush=True)
            threading.Event().wait()

    def machine(self, req, cfg=None, callback=None):  # the batched server: stuck in the scheduler's thread
        self.generate(req, cfg, callback)
        yield

cfg = ServerConfig(port=0, metrics_port=None, drain_seconds=float(sys.argv[1]), policy="paper")  # no gate to ask
serve(cfg, GenerationService(cfg, Metrics(), StuckPipe()))
"""


def wait_for_line(lines: queue.Queue, text: str, seen: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in seen):
        seen.append(lines.get(timeout=max(0.01, deadline - time.monotonic())))


def test_sigterm_ends_the_process_even_with_a_worker_stuck_in_one_engine_call():
    """What used to take kill -9: a worker that never returns. Its client is told UNAVAILABLE at the drain's end
    and the process exits (os._exit after logging) instead of joining the stuck thread forever."""
    drain = 0.5
    proc, port, lines = start_process(["-c", STUCK_SERVER, str(drain)])
    seen: list[str] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            future = pb_grpc.GenerationStub(ch).Generate.future(text_req(prompt="stuck"), timeout=300)
            wait_for_line(lines, "entered the engine call", seen)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert future.exception(timeout=30).code() == grpc.StatusCode.UNAVAILABLE
        proc.wait(timeout=drain + 5)
        exit_s = time.monotonic() - t0
        print(f"\nstuck worker: SIGTERM -> process gone in {exit_s:.2f} s (drain_seconds {drain})")
        assert proc.returncode == 0 and exit_s < drain + 5
        wait_for_line(lines, "still busy after the drain", seen, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()


# -- #14 admission before decoding ----------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size and carries no pixels: signature, IHDR, an empty IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", b"")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_image_burst_is_admitted_before_it_is_decoded(pipe, start_server, monkeypatch):
    """19 concurrent 4096x4096 PNGs (25 KB each, ~50 MB decoded): they used to be decoded in the handler threads
    before the queue limit applied (575 MB -> 1850 MB RSS). Now the header is checked, the request admitted or
    refused, and only admitted ones are decoded, in their worker slot, one at a time."""
    from server import validation
    held = HeldPipe(pipe)
    s = start_server(held, workers=1, queue_size=2)
    buf = io.BytesIO()
    Image.new("L", (4096, 4096), 7).save(buf, format="PNG")
    bomb = pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=buf.getvalue()), params=pb.GenerationParams(
        steps=1))
    decodes = []
    real = validation.decode_image
    monkeypatch.setattr(validation, "decode_image", lambda *a, **k: decodes.append(1) or real(*a, **k))
    base = peak = rss_bytes()
    sampling = threading.Event()

    def sample():
        nonlocal peak
        while not sampling.wait(0.002):
            peak = max(peak, rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    futures = [s.stub.Generate.future(bomb, timeout=120) for _ in range(19)]
    wait_until(lambda: requests_ended(s, "RESOURCE_EXHAUSTED", "inverted_latent") == 16, "16 refused")
    assert len(decodes) <= 1  # the refused ones cost no decode; the queued ones are not decoded yet
    held.release.set()
    codes = sorted(f.exception().code().name if f.exception() else "OK" for f in futures)
    sampling.set()
    sampler.join()
    growth = (peak - base) / 2**20
    print(f"\n19 concurrent 4096x4096 PNGs ({len(buf.getvalue())} bytes each): RSS {base / 2**20:.0f} MB -> peak "
          f"{peak / 2**20:.0f} MB (+{growth:.0f} MB), {len(decodes)} decodes, {codes.count('OK')} OK")
    assert codes == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 16
    assert len(decodes) == 3 and growth < 300
    # a header that claims more pixels than allowed is refused from the header alone
    with pytest.raises(grpc.RpcError) as err:
        s.stub.Generate(pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=png_header(5000, 5000))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pixels" in err.value.details()
    assert len(decodes) == 3
    # a valid header over missing pixels: admitted, then refused by the decode (a client error, not INTERNAL)
    with pytest.raises(grpc.RpcError) as err:
        s.stub.Generate(pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=png_header(64, 64))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("inverted_latent.image") and len(decodes) == 4


# -- #14 TLS and auth cannot half-apply -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    (d / "tokens.txt").write_text("# one token a line\ns3cret\n\n")
    return d


def test_half_a_tls_config_or_tokens_in_clear_refuse_to_start(tls_files, capsys):
    from irece_cli.main import main
    cert, key, tokens = (str(tls_files / n) for n in ("cert.pem", "key.pem", "tokens.txt"))
    # checked before the model is loaded: these return at once
    for argv, words in ((["--tls-cert", cert], ("tls_cert", "tls_key")), (["--tls-key", key], ("tls_key",)),
                        (["--host", "0.0.0.0", "--auth-token-file", tokens], ("TLS", "--insecure"))):
        assert main(["serve", "--port", "0", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("irece: error:") and all(w in err for w in words), err
    with pytest.raises(ValueError, match="tls_key"):
        Server(ServerConfig(tls_cert=cert, port=0))
    # tokens without TLS: fine on loopback, or where the operator says --insecure; a token file must hold one
    ServerConfig(auth_token_file=tokens).check_security()
    ServerConfig(host="0.0.0.0", auth_token_file=tokens, insecure=True).check_security()
    ServerConfig(host="0.0.0.0", auth_token_file=tokens, tls_cert=cert, tls_key=key).check_security()
    for host in ("::1", "[::1]", "localhost", "127.0.0.2"):
        ServerConfig(host=host, auth_tokens=["t"]).check_security()
    (tls_files / "empty.txt").write_text("# no token\n\n")
    with pytest.raises(ValueError, match="no token"):
        ServerConfig(auth_token_file=str(tls_files / "empty.txt")).check_security()


def test_tls_with_a_token_file_over_grpc(pipe, start_server, tls_files):
    cert, key, tokens = (str(tls_files / n) for n in ("cert.pem", "key.pem", "tokens.txt"))
    s = start_server(pipe, tls_cert=cert, tls_key=key, auth_token_file=tokens)
    creds = grpc.ssl_channel_credentials((tls_files / "cert.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{s.server.port}", creds) as ch:
        stub = pb_grpc.GenerationStub(ch)
        s.decode(stub.Generate(text_req(steps=1), metadata=[("authorization", "Bearer s3cret")], timeout=60))
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(text_req(steps=1), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:  # plaintext is not served
        s.stub.Generate(text_req(steps=1), metadata=[("authorization", "Bearer s3cret")], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# -- #14 IRECE fails closed ----------------------------------------------------------------------------------
def latent_req(pipe, latent: np.ndarray) -> pb.GenerateRequest:
    return pb.GenerateRequest(inverted_latent=pb.InvertedLatent(latent=tensor_to_wire(latent)),
                              params=pb.GenerationParams(steps=STEPS))


def test_overflowing_latents_and_embeddings_are_refused_and_irece_fails_closed(pipe, start_server):
    """A finite but overflowing latent (x1e20) or embedding (3e38) used to be accepted, with a NaN concept map,
    an empty mask and `intervened=false`. Validation now bounds them; past validation IRECE fails closed."""
    latent = random_latent(pipe)[0].numpy()
    d = pipe.backend.embed_dim
    huge_vec = np.full((1, d), 3e38 / math.sqrt(d), np.float32)  # L2 norm 3e38: finite in float32
    s = start_server(pipe)
    for req, field in ((latent_req(pipe, latent * 1e20), "inverted_latent.latent.data"),
                       (embedding_req(pipe, huge_vec), "embedding.embeddings[0].vectors.data")):
        with pytest.raises(grpc.RpcError) as err:
            s.stub.Generate(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)
    assert s.stub.Generate(latent_req(pipe, latent * 100)).irece.intervened  # within bounds: served as usual
    # with the range checks out of the way, IRECE itself refuses (nonfinite="error", the default) ...
    unchecked = dict(max_latent_abs=math.inf, max_embedding_norm=math.inf)
    s.server.service.limits = replace(s.server.service.limits, **unchecked)
    for req in (latent_req(pipe, latent * 1e20), embedding_req(pipe, huge_vec)):
        with pytest.raises(grpc.RpcError) as err:
            s.stub.Generate(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in err.value.details()
    # ... or masks the whole latent, by the operator's choice
    full = start_server(pipe, nonfinite="full_mask")
    full.server.service.limits = replace(full.server.service.limits, **unchecked)
    resp = full.stub.Generate(latent_req(pipe, latent * 1e20))
    assert resp.irece.intervened and resp.irece.mask_area == 1.0 and resp.irece.concepts[0].intervened
    full.decode(resp)
    assert requests_ended(s, "INTERNAL", "inverted_latent") == requests_ended(full, "INTERNAL", "inverted_latent") == 0


# -- #14 errors name the field and the rule, echo no input and no policy ---------------------------------------
def test_errors_echo_no_input_and_no_policy(pipe, start_server):
    s = start_server(pipe, allowed_concepts=["circle"], tau=0.37)  # operator: erases "star" with tau 0.37
    long = "x" * 100_000
    oversized_dtype = embedding_req(pipe)
    oversized_dtype.embedding.embeddings[0].vectors.dtype = long
    many_dims = pb.GenerateRequest(inverted_latent=pb.InvertedLatent(latent=pb.Tensor(
        dtype="float32", shape=[1] * 10_000, data=bytes(4))))
    stricter_no = text_req()
    stricter_no.irece.tau = 0.9
    cases = [
        # a 100 KB entry used to be echoed until gRPC refused the metadata (RESOURCE_EXHAUSTED)
        (pb.GenerateRequest(text=pb.TextPrompt(prompt="x"), suppress_concepts=[long]), "suppress_concepts[0]",
         grpc.StatusCode.INVALID_ARGUMENT),
        # the unknown-concept error used to list the catalogue, the operator's erased concepts included
        (pb.GenerateRequest(text=pb.TextPrompt(prompt="x"), suppress_concepts=["dragon"]), "suppress_concepts[0]",
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(text=pb.TextPrompt(prompt="x"), suppress_concepts=["circle"] * 17), "suppress_concepts",
         grpc.StatusCode.INVALID_ARGUMENT),
        (oversized_dtype, "embedding.embeddings[0].vectors.dtype", grpc.StatusCode.INVALID_ARGUMENT),
        (many_dims, "inverted_latent.latent.shape", grpc.StatusCode.INVALID_ARGUMENT),
        # the tau error used to state the operator's tau
        (stricter_no, "irece.tau", grpc.StatusCode.PERMISSION_DENIED),
    ]
    for req, field, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            s.stub.Generate(req)
        details = err.value.details()
        assert err.value.code() == code and details.startswith(f"{field}:"), details
        assert len(details) < 200 and "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in details
        assert not any(secret in details for secret in ("star", "circle", "0.37")), details


class FailingPipe(HeldPipe):
    """The pipeline, except that generation fails inside the engine with a message that names a file (alone, or in
    the batched scheduler's thread)."""

    def generate(self, req, cfg=None, callback=None):
        raise RuntimeError("/srv/models/secret-erasure.safetensors: CUDA error: an illegal memory access")

    def machine(self, req, cfg=None, callback=None):
        self.generate(req, cfg, callback)
        yield


def test_internal_errors_carry_a_request_id_and_the_details_go_to_the_log(pipe, start_server, caplog):
    s = start_server(FailingPipe(pipe))
    with caplog.at_level(logging.ERROR, logger="irece.server"):
        with pytest.raises(grpc.RpcError) as err:
            s.stub.Generate(text_req(steps=1))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details()
    assert "/srv" not in details and "CUDA" not in details
    rid = re.search(r"request id ([0-9a-f]{12})", details).group(1)
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and "secret-erasure.safetensors" in str(logged[0].exc_info[1])


# -- #14 the fuzz campaign ---------------------------------------------------------------------------------------
# The status codes the service documents (protos/irece/v1/generation.proto); which ones a call may end with
# depends on how it was sent.
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
CONCURRENT = ANSWERS | {grpc.StatusCode.RESOURCE_EXHAUSTED}
WITH_DEADLINE = CONCURRENT | {grpc.StatusCode.DEADLINE_EXCEEDED}
CANCELLED = WITH_DEADLINE | {grpc.StatusCode.CANCELLED}
FUZZ_REQUESTS = 2000

# Each field is drawn from valid values or from anything (half of the requests lean valid, so that generation runs
# often); valid sizes are the smallest ones and valid steps few, so that a valid request costs ~50 ms on one core.
SIDES = st.sampled_from([2, 2, 2, 3, 0, 4])  # in units of twice the VAE factor (8 px for the mini world); 0: default
STEPS_ST = st.sampled_from([1, 1, 1, 1, 2, 0])  # 0: the server's default (4 here)
GUIDANCE = st.sampled_from([0.0, 1.0, 5.0, 7.5])
BAD_SIDES = st.sampled_from([7, 33, 100_000, 2**32 - 1])  # pixels
ANY_STEPS = st.one_of(STEPS_ST, st.sampled_from([101, 2**32 - 1]))
ANY_GUIDANCE = st.one_of(GUIDANCE, st.floats(width=32))
TEXT = st.one_of(st.sampled_from(["", "a red star", "a circle on a black background"]), st.text(max_size=40))
ANY_TEXT = st.one_of(TEXT, st.sampled_from(["\x00", "x" * 2001]))
CONCEPTS = st.sampled_from(["star", "circle", "moon"])
ANY_CONCEPT = st.one_of(CONCEPTS, st.sampled_from(["dragon", "", "x" * 5000]), st.text(max_size=12))


@st.composite
def fuzz_tensor(draw, shapes: list[list[int]], valid: bool) -> pb.Tensor:
    kinds = ["valid"] if valid else ["valid", "scaled", "shape", "length", "dtype"]
    kind = draw(st.sampled_from(kinds))
    if kind in ("valid", "scaled", "length"):
        shape = draw(st.sampled_from(shapes))
        dtype = draw(st.sampled_from(["float32", "float16"]))
        arr = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape)
        if kind == "scaled":
            arr = arr * draw(st.sampled_from([1e2, 1e4, 1e20, 3e38, math.inf, math.nan]))
        with np.errstate(all="ignore"):
            data = arr.astype("<f4" if dtype == "float32" else "<f2").tobytes()
        if kind == "length":
            data = data[:draw(st.integers(0, len(data) - 1))]
        return pb.Tensor(dtype=dtype, shape=shape, data=data)
    if kind == "shape":
        return pb.Tensor(dtype="float32", shape=draw(st.lists(st.integers(-2, 70), max_size=6)),
                         data=draw(st.binary(max_size=256)))
    return pb.Tensor(dtype=draw(st.one_of(st.sampled_from(["int8", "float64", "", "FLOAT32"]), st.text(max_size=8))),
                     shape=draw(st.sampled_from(shapes)), data=draw(st.binary(max_size=64)))


@st.composite
def fuzz_image(draw, images: list[bytes], valid: bool) -> bytes:
    good = draw(st.sampled_from(images))
    kind = "valid" if valid else draw(st.sampled_from(["valid", "truncated", "flipped", "random", "header", "empty"]))
    if kind == "truncated":
        return good[:draw(st.integers(0, len(good) - 1))]
    if kind == "flipped":
        i = draw(st.integers(0, len(good) - 1))
        return good[:i] + bytes([good[i] ^ draw(st.integers(1, 255))]) + good[i + 1:]
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "header":
        return png_header(draw(st.sampled_from([1, 64, 4096, 5000, 2**31 - 1])), draw(st.sampled_from([1, 64, 4096])))
    return b"" if kind == "empty" else good


@st.composite
def fuzz_request(draw, pipe, images: list[bytes]) -> pb.GenerateRequest:
    """Every field of GenerateRequest and every modality, valid and not."""
    valid = draw(st.booleans())
    pick = (lambda ok, anything: draw(ok)) if valid else (lambda ok, anything: draw(anything))
    d, c, n = pipe.backend.embed_dim, pipe.backend.latent_channels, pipe.sample_size
    sides = SIDES.map(lambda k: k * 2 * pipe.backend.vae_scale_factor)
    any_side = st.one_of(sides, BAD_SIDES)
    msg = pb.GenerateRequest(params=pb.GenerationParams(
        steps=pick(STEPS_ST, ANY_STEPS), guidance=pick(GUIDANCE, ANY_GUIDANCE), seed=draw(st.integers(0, 2**64 - 1)),
        negative_prompt=pick(TEXT, ANY_TEXT) if draw(st.booleans()) else "",
        height=pick(sides, any_side), width=pick(sides, any_side)))
    kind = draw(st.sampled_from(["text", "embedding", "image", "latent"] + ([] if valid else ["none"])))
    if kind == "text":
        msg.text.prompt = pick(TEXT, ANY_TEXT)
    elif kind == "embedding":
        tokens = draw(st.lists(st.sampled_from(["<s>", "<t>", "<u>"]), min_size=1, max_size=3, unique=True)) if valid \
            else draw(st.lists(st.one_of(st.sampled_from(["<s>", "<s>x", " ", "", "x" * 70]), st.text(max_size=6)),
                               max_size=3))
        msg.embedding.prompt = " and ".join(f"a {t}" for t in tokens if valid or draw(st.booleans())) + \
            pick(TEXT, ANY_TEXT)
        shapes = [[d], [1, d], [2, d]] + ([] if valid else [[1, d + 1]])
        for t in tokens:
            msg.embedding.embeddings.add(token=t, vectors=draw(fuzz_tensor(shapes, valid)))
    else:
        inv = msg.inverted_latent
        inv.prompt, inv.inversion_prompt = pick(TEXT, ANY_TEXT), pick(TEXT, ANY_TEXT)
        inv.invert_with = pick(st.sampled_from([0, 1, 2]), st.sampled_from([0, 1, 2, 7]))  # 7: none (proto3: open)
        # latents and images at half the native size (the cheapest), at the native size, or as drawn
        msg.params.height = msg.params.width = draw(st.sampled_from([n * pipe.backend.vae_scale_factor // 2, 0]))
        if not valid and draw(st.booleans()):
            msg.params.height, msg.params.width = draw(any_side), draw(any_side)
        h = min(msg.params.height // pipe.backend.vae_scale_factor, n) or n  # a latent the test can afford to make
        if kind == "image":
            inv.image = draw(fuzz_image(images, valid))
        else:
            shapes = [[c, h, h], [1, c, h, h]] + ([] if valid else [[c, n, 2 * n], [c + 1, h, h]])
            inv.latent.CopyFrom(draw(fuzz_tensor(shapes, valid)))
    if draw(st.booleans()):
        msg.suppress_concepts.extend(draw(st.lists(CONCEPTS if valid else ANY_CONCEPT, max_size=3)))
    if draw(st.booleans()):
        msg.irece.disable = False if valid else draw(st.booleans())
        if draw(st.booleans()):
            msg.irece.tau = pick(st.sampled_from([0.0, 0.2, 0.4]),
                                 st.one_of(st.sampled_from([0.9, -1.0, 2.0]), st.floats(width=32)))
    return msg


def test_fuzz_campaign(served, pipe):
    """At least 2,000 generated requests over every field and modality, in batches sent one by one or all at once,
    some with tight deadlines or cancelled: every call ends with a documented status code, the server stays up,
    and a control request after every batch returns the image it returned before (the pipeline's own)."""
    from hypothesis import HealthCheck
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

    s = served
    side = s.side
    images = [png_bytes(model_image(pipe, "star")), png_bytes(np.zeros((8, 8, 3), np.uint8))]
    for mode, size, fmt in (("L", (40, 24), "PNG"), ("RGBA", (16, 16), "PNG"), ("P", (33, 17), "PNG"),
                            ("RGB", (side, side), "JPEG"), ("I;16", (12, 12), "PNG")):
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format=fmt)
        images.append(buf.getvalue())
    small = 4 * pipe.backend.vae_scale_factor  # the smallest size the UNet takes (16 px for the mini world)
    control = text_req(seed=5, steps=1, height=small, width=small)
    want = pipe.generate(Request(prompt="a red circle on a black background", seed=5, steps=1, height=small,
                                 width=small),
                         s.server.service.operator).uint8()[0]
    tally = {"requests": 0, "batches": 0, "control_retries": 0, "codes": {}}

    def ended(code: grpc.StatusCode, allowed: set, req) -> None:
        assert code in allowed, f"{code.name} for {req}"
        tally["requests"] += 1
        tally["codes"][code.name] = tally["codes"].get(code.name, 0) + 1

    def outcome(call) -> grpc.StatusCode:
        try:
            resp = call()
        except grpc.FutureCancelledError:  # cancelled by this side before an answer came
            return grpc.StatusCode.CANCELLED
        except grpc.RpcError as exc:
            return exc.code()
        Image.open(io.BytesIO(resp.png)).verify()  # every OK answer carries a PNG
        return grpc.StatusCode.OK

    requests_ = fuzz_request(pipe, images)

    class Campaign(RuleBasedStateMachine):
        @rule(batch=st.lists(requests_, min_size=3, max_size=16))
        def one_by_one(self, batch):
            for req in batch:
                ended(outcome(lambda: s.stub.Generate(req, timeout=120)), ANSWERS, req)

        @rule(batch=st.lists(requests_, min_size=3, max_size=12))
        def all_at_once(self, batch):  # past capacity (1 worker + 2 queued): RESOURCE_EXHAUSTED
            futures = [s.stub.Generate.future(req, timeout=120) for req in batch]
            for req, f in zip(batch, futures):
                ended(outcome(f.result), CONCURRENT, req)

        @rule(batch=st.lists(st.tuples(requests_, st.sampled_from([0.001, 0.02, 0.1])), min_size=1, max_size=6),
              cancel=st.booleans())
        def deadlines_and_cancels(self, batch, cancel):
            futures = [s.stub.Generate.future(req, timeout=t) for req, t in batch]
            if cancel:
                for f in futures:
                    f.cancel()
            for (req, _), f in zip(batch, futures):
                ended(outcome(f.result), CANCELLED if cancel else WITH_DEADLINE, req)

        @invariant()
        def control_returns_the_same_image(self):
            # abandoned work (deadlines, cancels) stops at its next check: wait for it, then the slot is free
            wait_until(lambda: gauge(s, "irece_inflight_requests") == gauge(s, "irece_queue_depth") == 0
                       and s.server.service.running == 0, "the server to be idle", 30)
            # A request the client cancelled at once may reach the server's handler only now and hold a slot
            # until its deadline (<= 0.1 s) passes: the control retries a refusal, as a client is told to. A slot
            # that leaked would refuse it for the whole 30 s.
            give_up = time.monotonic() + 30
            while True:
                try:
                    got = s.stub.Generate(control, timeout=60)
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > give_up:
                        raise
                    tally["control_retries"] += 1
                    time.sleep(0.05)
            assert np.array_equal(s.decode(got, size=(small, small)), want)
            tally["batches"] += 1

    t0 = time.monotonic()
    run_state_machine_as_test(Campaign, settings=settings(
        max_examples=55, stateful_step_count=10, deadline=None, database=None,
        suppress_health_check=list(HealthCheck)))
    wall = time.monotonic() - t0
    print(f"\nfuzz campaign: {tally['requests']} requests in {tally['batches']} batches, {wall:.0f} s; "
          f"codes {dict(sorted(tally['codes'].items()))}; control retried {tally['control_retries']} time(s)")
    assert tally["requests"] >= FUZZ_REQUESTS
    assert requests_ended(s, "INTERNAL", "text") == requests_ended(s, "INTERNAL", "embedding") == 0
    assert requests_ended(s, "INTERNAL", "inverted_latent") == requests_ended(s, "INTERNAL", "none") == 0


def test_free_port_is_bindable_and_outside_the_ranges_the_kernel_and_ray_hand_out():
    """A port from the kernel's ephemeral range was taken by one of ray.init's processes before Ray's proxy bound it."""
    import socket

    from server.config import FREE_PORTS
    lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else (32768, 60999)
    for _ in range(20):
        port = free_port()
        assert FREE_PORTS[0] <= port <= FREE_PORTS[1] and not lo <= port <= hi and not 10002 <= port <= 19999
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
