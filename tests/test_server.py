"""The gRPC service end to end over loopback: modalities, bad input, backend limits, policy, overload, cancellation,
seeds; and the IRECE report's one conversion (runtime -> wire -> JSON).

Image side, text width and latent shape come from the model under test (`IRECE_TEST_MODEL`). Waits are on observable
state (metrics, futures) with a deadline, never a fixed sleep; requests that must stay busy are held by `HeldPipe`.
"""
import io
import json
import math
import threading
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
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
from server.config import ServerConfig
from server.metrics import Metrics
from server.service import GenerationService
from server.validation import RequestError, to_pipeline_request

from .conftest import MODEL, image_side, model_image

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
    fields = dict(model=str(MODEL), concepts=["star"], port=0, metrics_port=0, workers=1, queue_size=2,
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
    holds its slot exactly as long as the test wants, whatever the model's speed."""

    def __init__(self, pipe):
        self.pipe, self.release = pipe, threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, req, cfg=None, callback=None):
        def held(stage, step, total):
            while not self.release.wait(0.01):
                callback(stage, step, total)
            callback(stage, step, total)
        return self.pipe.generate(req, cfg, held)


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
    assert s.metric("irece_suppression_ratio", concept="star") > 0
    assert s.metric("irece_stage_duration_seconds_count", stage="inversion") >= 1


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
    wait_until(lambda: ended("CANCELLED") == 1, "the cancelled request to leave between two steps")
    assert s.metric("irece_inflight_requests") == 0
    with pytest.raises(grpc.RpcError) as err:  # held: it cannot finish before its deadline
        s.stub.Generate(text_req(seed=3), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: ended("DEADLINE_EXCEEDED") == 1, "the server to drop the expired request")
    assert s.metric("irece_inflight_requests") == 0
    held.release.set()
    s.decode(s.stub.Generate(text_req(seed=4), timeout=60))


def test_bearer_auth(pipe, start_server):
    s = start_server(pipe, auth_tokens=["s3cret"])
    with pytest.raises(grpc.RpcError) as err:
        s.stub.Generate(text_req(steps=1))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    s.decode(s.stub.Generate(text_req(steps=1), metadata=[("authorization", "Bearer s3cret")]))


tensor_st = st.builds(lambda dtype, shape, data: pb.Tensor(dtype=dtype, shape=shape, data=data),
                      st.sampled_from(["float32", "float16", "int8", "", "float64"]),
                      st.lists(st.integers(-2, 70), min_size=0, max_size=4), st.binary(max_size=600))
request_st = st.one_of(
    st.builds(lambda p, s, g, h: pb.GenerateRequest(text=pb.TextPrompt(prompt=p), params=pb.GenerationParams(
        steps=s, guidance=g, height=h)), st.text(max_size=80), st.integers(0, 300),
        st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0, 7, 32, 64, 100000])),
    st.builds(lambda p, tok, t: pb.GenerateRequest(embedding=pb.EmbeddingPrompt(
        prompt=p, embeddings=[pb.LearnedEmbedding(token=tok, vectors=t)])), st.text(max_size=40),
        st.text(max_size=8), tensor_st),
    st.builds(lambda b: pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=b)), st.binary(max_size=300)),
    st.builds(lambda t: pb.GenerateRequest(inverted_latent=pb.InvertedLatent(latent=t)), tensor_st),
    st.builds(lambda c: pb.GenerateRequest(text=pb.TextPrompt(prompt="x"), suppress_concepts=c),
              st.lists(st.text(max_size=10), max_size=3)),
)


def test_fuzzed_requests_never_crash_the_server(served, pipe):
    """Random requests get an image or a client error (never INTERNAL); afterwards the server still returns
    exactly the pipeline's own image and report. Self-contained: passes alone (`-k fuzz`) and in any order."""

    @settings(max_examples=60, deadline=None)
    @given(request_st)
    def one(request_):
        request_.params.steps = min(request_.params.steps, 2) if request_.params.steps else 1
        try:
            served.stub.Generate(request_, timeout=60)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), exc.details()

    one()
    got = served.stub.Generate(text_req(seed=5, steps=STEPS))
    want = pipe.generate(Request(prompt="a red circle on a black background", seed=5, steps=STEPS),
                         served.server.service.operator)
    assert np.array_equal(served.decode(got), want.uint8()[0])
    assert same_json(report.to_dict(got.irece), at_wire_precision(want.irece.to_dict()))
