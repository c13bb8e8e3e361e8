"""`irece serve --ray`: the GenerationService as a Ray Serve deployment (server/ray_serve.py). One local Ray instance
in this process, 2 replicas behind Ray Serve's gRPC proxy, the unchanged irece.v1 API: concurrent clients, status
codes through the proxy (INVALID_ARGUMENT naming the field, UNAUTHENTICATED, RESOURCE_EXHAUSTED, a deadline that
stops the replica's work), health, `irece client`, and every replica's metrics at Ray's Prometheus endpoint.
Skipped only where ray is not installed (`pip install -e '.[ray]'`)."""
import io
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]' (the ray extra)")
pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e '.[ray]' (the ray extra)")

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from PIL import Image  # noqa: E402

from protos.irece.v1 import generation_pb2 as pb  # noqa: E402
from protos.irece.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from server import ray_serve  # noqa: E402
from server.config import configure  # noqa: E402

from .conftest import MODEL, image_side  # noqa: E402

TOKEN = "ray-test-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]
STEPS = 4
LONG_STEPS = 500  # a request that would run for seconds (at most the schedule's 1000): it must be stopped, not finished


def config_file(tmp: Path, **extra) -> Path:
    lines = {"model": f'"{MODEL}"', "concepts": '["star"]', "default_steps": str(STEPS), "workers": "1",
             "queue_size": "2", "max_steps": str(LONG_STEPS), "auth_tokens": f'["{TOKEN}"]', "insecure": "true",
             "drain_seconds": "5"} | extra
    path = tmp / "server.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))
    return path


def text_req(seed=1, prompt="a red star on a black background", **params):
    return pb.GenerateRequest(text=pb.TextPrompt(prompt=prompt), params=pb.GenerationParams(seed=seed, **params))


class Cluster:
    def __init__(self, server: ray_serve.RayServer, side: int):
        self.server, self.side = server, side
        self.channel = grpc.insecure_channel(server.address)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def generate(self, req, timeout: float = 120.0):
        """(response, the replica that answered, from the trailing metadata)."""
        resp, call = self.stub.Generate.with_call(req, metadata=AUTH, timeout=timeout)
        return resp, dict(call.trailing_metadata())[ray_serve.REPLICA_HEADER]

    def metrics(self, name: str) -> list[tuple[dict, float]]:
        """Every sample of `name` that Ray's metrics agent serves (what Prometheus scrapes)."""
        from prometheus_client.parser import text_string_to_metric_families
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        return [(s.labels, s.value) for f in text_string_to_metric_families(body) for s in f.samples if s.name == name]

    def wait_metrics(self, name: str, ok, what: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            samples = self.metrics(name)
            if ok(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout} s for {what}; {name}: {samples}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pipe):
    tmp = tmp_path_factory.mktemp("ray")
    server = ray_serve.start_ray_server(config_file(tmp), replicas=2, port=ray_serve.free_port(), num_cpus=2,
                                        metrics_export_port=ray_serve.free_port(), metrics_report_ms=1000,
                                        log_to_driver=False)
    c = Cluster(server, image_side(pipe))
    try:
        yield c
    finally:
        c.channel.close()
        server.stop()


def decode(resp, side: int) -> np.ndarray:
    img = np.asarray(Image.open(io.BytesIO(resp.png)))
    assert img.shape == (side, side, 3)
    return img


# -- two replicas, concurrent clients ------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_replicas_answer_concurrent_clients(cluster):
    """6 clients at once (the deployment's capacity: 2 replicas x (1 worker + 2 queued)): every response is a valid
    image with the operator's IRECE (policy from the config file on each replica), both replicas answer, and the
    same request gives the same image whichever replica ran it."""
    start = threading.Barrier(6)

    def client(i):
        start.wait()
        return cluster.generate(text_req(seed=5 if i % 2 else 100 + i))
    with futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(client, range(6)))
    replicas = {r for _, r in answers}
    assert len(replicas) == 2, replicas
    for resp, _ in answers:
        decode(resp, cluster.side)
        assert resp.modality == "text" and resp.finish_reason == pb.FINISH_REASON_COMPLETED
        # the recommended policy: one report entry per look (t* and the rechecks), all of the operator's concept
        assert {c.concept for c in resp.irece.concepts} == {"star"} and resp.irece.step_index >= 0
    same = [(resp.png, r) for i, (resp, r) in enumerate(answers) if i % 2]
    assert len({png for png, _ in same}) == 1, "one seed, one image on every replica"
    # streaming through the proxy: progress for each step, then the result
    events = list(cluster.stub.GenerateStream(text_req(), metadata=AUTH, timeout=120))
    assert [e.progress.step for e in events if e.HasField("progress") and e.progress.stage == "denoising"] \
        == list(range(STEPS))
    decode(events[-1].result, cluster.side)
    health = health_pb2_grpc.HealthStub(cluster.channel).Check(
        health_pb2.HealthCheckRequest(service="irece.v1.Generation"), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
def test_irece_client_works_unchanged(cluster, tmp_path):
    from irece_cli.main import build_parser
    from server.client import run_client
    a = build_parser().parse_args(["client", "--target", cluster.server.address, "--prompt", "a star",
                                   "--token-auth", TOKEN, "--out", str(tmp_path / "o.png"), "--json"])
    out = run_client(a)
    assert out["modality"] == "text" and {c["concept"] for c in out["irece"]["concepts"]} == {"star"}
    assert Image.open(tmp_path / "o.png").size == (cluster.side, cluster.side)


# -- status codes through Ray's proxy ------------------------------------------------------------------------------
@pytest.mark.slow
def test_status_codes_pass_through_the_proxy(cluster):
    stub = cluster.stub
    # invalid input: INVALID_ARGUMENT naming the field, unary and streaming
    for call in (lambda r: stub.Generate(r, metadata=AUTH, timeout=60),
                 lambda r: list(stub.GenerateStream(r, metadata=AUTH, timeout=60))):
        for req, field in ((text_req(steps=LONG_STEPS + 1), "params.steps"), (text_req(height=33), "params.height"),
                           (pb.GenerateRequest(), "input")):
            with pytest.raises(grpc.RpcError) as err:
                call(req)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details().startswith(field)
    # no token, a wrong token: UNAUTHENTICATED (checked in the replica: Ray's proxy has no interceptors)
    for md in (None, [("authorization", "Bearer nope")]):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(text_req(), metadata=md, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
def test_deadline_stops_the_replica_and_overload_is_refused(cluster):
    """The proxy does not forward the deadline, but cancels the replica's request when it passes: the service
    stops the work (CANCELLED in its metrics, nothing left in flight) instead of running LONG_STEPS steps. Over
    capacity, RESOURCE_EXHAUSTED at once."""
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        cluster.stub.Generate(text_req(steps=LONG_STEPS), metadata=AUTH, timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 5
    # LONG_STEPS take ~9 s on one core: the worker is gone (its slot freed) within seconds of the deadline
    cluster.wait_metrics("ray_irece_inflight_requests", lambda s: s and sum(v for _, v in s) == 0,
                         "no request left generating", timeout=4)
    cluster.wait_metrics("ray_irece_requests_total",
                         lambda s: any(lb.get("code") == "CANCELLED" and v >= 1 for lb, v in s),
                         "the replica to record the cancelled request")
    # overload: 6 long requests fill the capacity (2 replicas x (1 worker + 2 queued)) until their deadline; 8
    # more meanwhile: Ray's router holds up to 6 (served once the long ones are cancelled), the rest are refused
    def call(req, timeout):
        t = time.monotonic()
        try:
            cluster.generate(req, timeout=timeout)
            return "OK", time.monotonic() - t
        except grpc.RpcError as exc:
            return exc.code().name, time.monotonic() - t
    with futures.ThreadPoolExecutor(14) as pool:
        held = [pool.submit(call, text_req(seed=i, steps=LONG_STEPS), 4.0) for i in range(6)]
        time.sleep(1.0)
        burst = [pool.submit(call, text_req(seed=10 + i), 60.0) for i in range(8)]
        held, burst = [f.result() for f in held], [f.result() for f in burst]
    assert [code for code, _ in held] == ["DEADLINE_EXCEEDED"] * 6, held
    refused = [t for code, t in burst if code == "RESOURCE_EXHAUSTED"]
    assert len(refused) >= 2 and max(refused) < 1.0, burst  # at once, not after a wait
    assert {code for code, _ in burst} == {"OK", "RESOURCE_EXHAUSTED"}, burst


@pytest.mark.slow
def test_metrics_of_every_replica_reach_prometheus(cluster):
    """Ray's metrics agent serves each replica's irece_* series (ray_ prefix, labelled by replica) at the port
    Prometheus scrapes; the OK counts add up to what the clients saw."""
    with futures.ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(lambda i: cluster.generate(text_req(seed=200 + i))[1], range(4)))
    assert len(set(seen)) == 2, seen

    def both(samples):
        ok = {lb["replica"]: v for lb, v in samples if lb.get("code") == "OK" and lb.get("modality") == "text"}
        return len(ok) == 2 and all(v >= 1 for v in ok.values())
    samples = cluster.wait_metrics("ray_irece_requests_total", both, "OK counts from both replicas")
    assert {lb["deployment"] for lb, _ in samples} == {ray_serve.DEPLOYMENT_NAME}
    assert {lb["application"] for lb, _ in samples} == {ray_serve.APP_NAME}
    # every metric of the service is exported: histograms with their buckets, per replica
    stage = cluster.metrics("ray_irece_stage_duration_seconds_count")
    assert len({lb["replica"] for lb, _ in stage}) == 2
    assert cluster.metrics("ray_irece_interventions_total") and cluster.metrics("ray_irece_mask_area_ratio_bucket")
    # Ray Serve's own per-replica series sit beside them (requests being processed: what autoscaling reads)
    assert len({lb["replica"] for lb, _ in cluster.metrics("ray_serve_replica_processing_queries")}) == 2


# -- without a Ray instance ----------------------------------------------------------------------------------------
def test_ray_refuses_tls_and_clear_tokens(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ValueError, match="plaintext only"):
        ray_serve.application(config_file(tmp_path, tls_cert=f'"{cert}"', tls_key=f'"{cert}"'))
    with pytest.raises(ValueError, match="in clear"):
        ray_serve.application(config_file(tmp_path, insecure="false"))
    ray_serve.application(config_file(tmp_path))  # tokens with insecure = true: TLS terminated in front


def test_deployment_options_autoscale_on_ongoing_requests(tmp_path):
    cfg = configure(config_file(tmp_path, workers="2", queue_size="3"))
    fixed = ray_serve.deployment_options(cfg, replicas=3, max_replicas=None, replica_cpus=1)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 5 and fixed["graceful_shutdown_timeout_s"] == 5
    assert fixed["max_queued_requests"] == 15  # a burst of the whole capacity is never refused early
    auto = ray_serve.deployment_options(cfg, replicas=2, max_replicas=6, replica_cpus=0.5)
    assert auto["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 6,
                                          "target_ongoing_requests": 2}
    assert "num_replicas" not in auto and auto["ray_actor_options"] == {"num_cpus": 0.5}
    assert auto["max_queued_requests"] == 30
    assert ray_serve.deployment_options(cfg, 1, None, 1, router_queue=-1)["max_queued_requests"] == -1


def test_serve_run_config_in_the_repo_builds_the_app():
    """deploy/ray-serve.yaml is a valid Ray Serve config whose gRPC servicers and application are ours."""
    import yaml
    from ray.serve.schema import ServeDeploySchema
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "deploy" / "ray-serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.grpc_options.grpc_servicer_functions == ray_serve.SERVICER_FUNCTIONS
    app = schema.applications[0]
    assert app.import_path == "server.ray_serve:build_app"
    args = dict(app.args, config=str(root / app.args["config"]))
    bound = ray_serve.build_app(args)
    assert bound._bound_deployment.name == ray_serve.DEPLOYMENT_NAME
    assert bound._bound_deployment._deployment_config.autoscaling_config.max_replicas == 4

