"""The gRPC service end to end over loopback: modalities, bad input, policy, overload, cancellation, seeds."""
import io
import socket
import time
import urllib.request

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from protos.irece.v1 import generation_pb2 as pb
from protos.irece.v1 import generation_pb2_grpc as pb_grpc
from server.app import Server
from server.client import tensor_to_wire
from server.config import ServerConfig
from server.metrics import Metrics
from server.service import GenerationService

from .conftest import MODEL

STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(pipe, **overrides):
    fields = dict(model=str(MODEL), concepts=["star"], port=0, metrics_port=free_port(), workers=1, queue_size=2,
                  default_steps=STEPS)
    cfg = ServerConfig(**(fields | overrides))
    metrics = Metrics()
    server = Server(cfg, GenerationService(cfg, metrics, pipe), metrics).start(warm=False)
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return server, ch, pb_grpc.GenerationStub(ch)


@pytest.fixture(scope="module")
def served(pipe):
    server, ch, stub = start(pipe)
    yield server, stub
    ch.close()
    server.stop(0)


def png_of(concept="star", seed=0) -> bytes:
    from miniworld.shapes import render
    buf = io.BytesIO()
    Image.fromarray(render(concept, seed=seed).image).save(buf, format="PNG")
    return buf.getvalue()


def decode(resp) -> np.ndarray:
    img = np.asarray(Image.open(io.BytesIO(resp.png)))
    assert img.shape == (32, 32, 3)
    return img


def text_req(prompt="a red circle on a black background", seed=1, **params):
    return pb.GenerateRequest(text=pb.TextPrompt(prompt=prompt), params=pb.GenerationParams(seed=seed, **params))


def embedding_req(pipe, vec=None, token="<s>"):
    vec = pipe.encode_prompt("x")[0, 0:1].numpy() if vec is None else vec
    return pb.GenerateRequest(embedding=pb.EmbeddingPrompt(
        prompt=f"a {token} on a black background",
        embeddings=[pb.LearnedEmbedding(token=token, vectors=tensor_to_wire(vec))]))


def metric(server, name, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.cfg.metrics_port}/metrics").read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_one_request_per_modality_and_metrics(served, pipe):
    server, stub = served
    before = metric(server, "irece_interventions_total", concept="star")
    r1 = stub.Generate(text_req())
    r2 = stub.Generate(embedding_req(pipe))
    r3 = stub.Generate(pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=png_of("star"))))
    for r, modality in ((r1, "text"), (r2, "embedding"), (r3, "inverted_latent")):
        decode(r)
        assert r.modality == modality and r.finish_reason == pb.FINISH_REASON_COMPLETED
        assert [c.concept for c in r.irece.concepts] == ["star"]
    # the erased concept's inverted latent: IRECE localizes it and masks a region
    assert r3.irece.intervened and 0 < r3.irece.mask_area < 1
    assert metric(server, "irece_interventions_total", concept="star") >= before + 1
    assert metric(server, "irece_requests_total", modality="inverted_latent", code="OK") >= 1
    assert metric(server, "irece_suppression_ratio", concept="star") > 0
    assert metric(server, "irece_stage_duration_seconds_count", stage="inversion") >= 1


def test_stream_reports_progress_then_result(served):
    _, stub = served
    events = list(stub.GenerateStream(text_req()))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress if p.stage == "denoising"] == list(range(STEPS))
    assert events[-1].HasField("result") and decode(events[-1].result) is not None


def test_health_serving_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    server, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="irece.v1.Generation"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "irece.v1.Generation" in [s.name for s in resp.list_services_response.service]


BAD = [
    (pb.GenerateRequest(), "input"),
    (text_req(steps=1000), "params.steps"),
    (text_req(guidance=100.0), "params.guidance"),
    (text_req(guidance=float("nan")), "params.guidance"),
    (text_req(height=33), "params.height"),
    (pb.GenerateRequest(text=pb.TextPrompt(prompt="x"), suppress_concepts=["dragon"]), "suppress_concepts[0]"),
    (pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=b"not an image")), "inverted_latent.image"),
    (pb.GenerateRequest(inverted_latent=pb.InvertedLatent()), "inverted_latent.source"),
    (pb.GenerateRequest(inverted_latent=pb.InvertedLatent(
        latent=pb.Tensor(dtype="float32", shape=[4, 3, 3], data=bytes(4 * 36)))), "inverted_latent.latent.shape"),
]


@pytest.mark.parametrize("request_, field", BAD, ids=[f for _, f in BAD])
def test_bad_input_is_invalid_argument_naming_the_field(served, request_, field):
    _, stub = served
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)


def test_bad_embeddings(served, pipe):
    _, stub = served
    d = pipe.engines.embed_dim
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


def test_oversized_image_and_message(pipe):
    server, ch, stub = start(pipe, max_image_bytes=50_000, max_message_bytes=200_000)
    try:
        big = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(big, format="PNG")
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=big.getvalue())))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("inverted_latent.image")
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=b"\x89PNG" + bytes(300_000))))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own max message size
        decode(stub.Generate(text_req()))  # still up
    finally:
        ch.close()
        server.stop(0)


def test_client_cannot_disable_or_weaken_operator_concepts(served):
    _, stub = served
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


def test_same_seed_same_image_alone_or_beside_others(pipe):
    server, ch, stub = start(pipe, workers=2, queue_size=4)
    try:
        alone = decode(stub.Generate(text_req(seed=42)))
        futures = [stub.Generate.future(text_req(seed=s)) for s in (42, 7, 42, 9)]
        results = [decode(f.result(timeout=120)) for f in futures]
        assert np.array_equal(results[0], alone) and np.array_equal(results[2], alone)
        assert not np.array_equal(results[1], alone)
    finally:
        ch.close()
        server.stop(0)


def test_overload_excess_refused_accepted_complete(pipe):
    server, ch, stub = start(pipe, workers=1, queue_size=1, default_steps=12)
    try:
        futures = [stub.Generate.future(text_req(seed=s)) for s in range(6)]
        codes, ok = [], 0
        for f in futures:
            try:
                decode(f.result(timeout=120))
                ok += 1
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert ok >= 2 and codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert ok + len(codes) == 6
        decode(stub.Generate(text_req()))  # capacity came back
    finally:
        ch.close()
        server.stop(0)


def test_cancel_and_deadline_free_capacity(pipe):
    server, ch, stub = start(pipe, workers=1, queue_size=0, default_steps=40)
    try:
        slow = stub.Generate.future(text_req(seed=1))
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as err:  # the only slot is taken
            stub.Generate(text_req(seed=2), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        slow.cancel()
        t0 = time.time()
        while time.time() - t0 < 10:  # the cancelled request leaves between two steps
            if metric(server, "irece_inflight_requests") == 0:
                break
            time.sleep(0.05)
        assert metric(server, "irece_inflight_requests") == 0
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(text_req(seed=3), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.5)
        decode(stub.Generate(text_req(seed=4, steps=2), timeout=60))
    finally:
        ch.close()
        server.stop(0)


def test_bearer_auth(pipe):
    server, ch, stub = start(pipe, auth_tokens=["s3cret"])
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(text_req(steps=1))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        resp = stub.Generate(text_req(steps=1), metadata=[("authorization", "Bearer s3cret")])
        assert decode(resp) is not None
    finally:
        ch.close()
        server.stop(0)


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
    st.builds(lambda b, t: pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=b)), st.binary(max_size=300),
              st.none()),
    st.builds(lambda t: pb.GenerateRequest(inverted_latent=pb.InvertedLatent(latent=t)), tensor_st),
    st.builds(lambda c: pb.GenerateRequest(text=pb.TextPrompt(prompt="x"), suppress_concepts=c),
              st.lists(st.text(max_size=10), max_size=3)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_st)
def test_fuzzed_requests_never_crash_the_server(served, request_):
    _, stub = served
    request_.params.steps = min(request_.params.steps, 2) if request_.params.steps else 1
    try:
        stub.Generate(request_, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), exc.details()


def test_server_still_correct_after_fuzz(served, pipe):
    from irece_runtime.pipeline import Request
    _, stub = served
    got = decode(stub.Generate(text_req(seed=5, steps=STEPS)))
    cfg = GenerationService(served[0].cfg, Metrics(), pipe).operator
    want = pipe.generate(Request(prompt="a red circle on a black background", seed=5, steps=STEPS), cfg).uint8()[0]
    assert np.array_equal(got, want)
