"""`irece serve --ray`: the GenerationService as a Ray Serve deployment, N replicas behind Ray Serve's gRPC proxy,
which serves the unchanged irece.v1 API (`irece client` works against it as is).

Every replica builds its own GenerationService from the same config file and flags (`configure`): the operator
policy and the limits are the same on each. A replica takes at most workers + queue_size requests (Ray routes no
more to it: `max_ongoing_requests`); Ray's router holds up to the deployment's capacity again per proxy
(`deployment_options`), and past that the client gets RESOURCE_EXHAUSTED at once. With max_replicas > replicas, Ray
autoscales on ongoing requests, aiming at `workers` requests per replica.

What differs behind Ray's proxy (it has no interceptors, serves plaintext only, and listens on every interface):
- status codes: the service's `context.abort` sets code and details on Ray's gRPC context before raising, and Ray
  passes them to the client (INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED, ...).
- auth: the bearer-token check runs in the replica, on the request metadata Ray forwards: same tokens, same
  UNAUTHENTICATED, same metrics (the request is already parsed by then). Tokens cross the proxy in clear, so a
  config with tokens must say `insecure = true` (TLS terminated in front of the proxy) or it refuses to start.
- TLS: Ray's gRPC proxy cannot terminate it; a config with tls_cert/tls_key refuses to start. Front the proxy with
  a TLS-terminating load balancer (Envoy, a cloud load balancer, a Kubernetes ingress) on a private network.
- message size: the replica refuses requests over max_message_bytes (RESOURCE_EXHAUSTED); a local Ray started here
  also gives the proxy that limit (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE); on a cluster set it where Ray starts.
- deadlines: Ray's proxy does not forward the client's deadline. When it passes, the client's call ends, the proxy
  cancels the replica's request, and the service stops the work at its next check (`is_active()` turns false);
  the server's own max_request_seconds applies as before.
- metrics: `RayMetrics` records every metric twice, in the replica's own registry and as a Ray metric; Ray's
  metrics agent on each node serves all of its replicas' series, labelled deployment/replica/application, at the
  node's metrics export port, prefixed `ray_` (ray_irece_requests_total{replica=...}).
- drain: when Ray stops a replica it routes nothing new to it and waits graceful_shutdown_timeout_s =
  drain_seconds for running requests; then the service drains (running work aborted, UNAVAILABLE).
- health: grpc.health.v1 Check is answered by a replica (SERVING once one is up); Watch is not served.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import ray
from grpc_health.v1 import health_pb2
from prometheus_client import Counter, Gauge, Histogram
from ray import serve
from ray.serve import metrics as ray_metrics
from ray.serve.config import gRPCOptions

from .config import ServerConfig, configure, free_port
from .metrics import Metrics

log = logging.getLogger("irece.server")
SERVICER_FUNCTIONS = ["protos.irece.v1.generation_pb2_grpc.add_GenerationServicer_to_server",
                      "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
APP_NAME = "irece"
DEPLOYMENT_NAME = "Generation"
REPLICA_HEADER = "irece-replica"  # trailing metadata: which replica answered
SERVICE_NAME = "irece.v1.Generation"


# -- metrics: each replica's series, exported by Ray's per-node metrics agent -------------------------------------
class _TeeChild:
    """One labelled series: the prometheus_client child and its Ray twin's tags."""

    def __init__(self, prom, twin, tags: dict, lock: threading.Lock, sum_twin=None):
        self.prom, self.twin, self.tags, self.lock, self.sum_twin = prom, twin, tags, lock, sum_twin

    def inc(self, amount: float = 1.0) -> None:
        with self.lock:
            self.prom.inc(amount)
            if isinstance(self.twin, ray_metrics.Counter):
                if amount > 0:
                    self.twin.inc(amount, tags=self.tags)
                elif amount == 0:  # created at zero (Metrics.initialise): Ray's inc refuses 0, a 0 recorded exports it
                    self.twin._record(0.0, tags=self.tags)
            else:  # a gauge: Ray's only sets
                self.twin.set(self.prom._value.get(), tags=self.tags)

    def dec(self, amount: float = 1.0) -> None:
        with self.lock:
            self.prom.dec(amount)
            self.twin.set(self.prom._value.get(), tags=self.tags)

    def set(self, value: float) -> None:
        with self.lock:
            self.prom.set(value)
            self.twin.set(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.prom.observe(value)
        self.twin.observe(value, tags=self.tags)
        if self.sum_twin is not None and value > 0:
            self.sum_twin.inc(value, tags=self.tags)

    def __getattr__(self, name):  # anything else from prometheus_client
        return getattr(self.prom, name)


class _Tee:
    """A prometheus_client metric and a Ray metric of the same name, kind, labels and buckets, updated together."""

    def __init__(self, prom):
        self.prom, self.lock, self.sum_twin = prom, threading.Lock(), None
        name, doc, keys = prom._name, prom._documentation, tuple(prom._labelnames)
        if isinstance(prom, Counter):
            self.twin = ray_metrics.Counter(f"{name}_total", doc, tag_keys=keys)
        elif isinstance(prom, Gauge):
            self.twin = ray_metrics.Gauge(name, doc, tag_keys=keys)
        else:  # Ray's buckets must be positive: the 0 bucket becomes 1e-9, +Inf is implied
            bounds = [b if b > 0 else 1e-9 for b in prom._upper_bounds if b != float("inf")]
            self.twin = ray_metrics.Histogram(name, doc, boundaries=bounds, tag_keys=keys)
            # Ray exports a histogram's _sum from its buckets' midpoints (an observed 1 adds 0.5): the exact sum
            # travels as a counter beside it, {name}_observed_sum_total
            self.sum_twin = ray_metrics.Counter(f"{name}_observed_sum_total", f"{doc} (exact sum of observations)",
                                                tag_keys=keys)

    def labels(self, *values, **named) -> _TeeChild:
        tags = {k: str(v) for k, v in zip(self.prom._labelnames, values)} | {k: str(v) for k, v in named.items()}
        return _TeeChild(self.prom.labels(*values, **named), self.twin, tags, self.lock, self.sum_twin)

    def _bare(self) -> _TeeChild:
        return _TeeChild(self.prom, self.twin, {}, self.lock, self.sum_twin)

    def inc(self, amount: float = 1.0) -> None:
        self._bare().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._bare().dec(amount)

    def set(self, value: float) -> None:
        self._bare().set(value)

    def observe(self, value: float) -> None:
        self._bare().observe(value)

    def __getattr__(self, name):
        return getattr(self.prom, name)


class RayMetrics(Metrics):
    """The service's metrics, each also recorded as a Ray metric (ray.serve.metrics: tagged with deployment, replica
    and application). Ray's metrics agent on every node serves them at the node's metrics export port
    (`ray start --metrics-export-port`); Prometheus scrapes every node, found through the file Ray writes on the
    head node, /tmp/ray/prom_metrics_service_discovery.json (file_sd_configs). Names gain Ray's `ray_` prefix."""

    def __init__(self):
        super().__init__()
        for attr, value in list(vars(self).items()):
            if isinstance(value, (Counter, Gauge, Histogram)):
                setattr(self, attr, _Tee(value))


# -- the gRPC context the service sees ------------------------------------------------------------------------------
class Aborted(Exception):
    """The call ends with this status: set on Ray's gRPC context first, which Ray's proxy hands to the client."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)  # both in args: Ray pickles the exception to its proxy, which rebuilds it
        self.code, self.details = code, details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class RayContext:
    """What GenerationService uses of a grpc.ServicerContext, over Ray Serve's RayServegRPCContext."""

    def __init__(self, ray_context):
        self.ray = ray_context
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def is_active(self) -> bool:
        return not self.cancelled.is_set()

    def time_remaining(self) -> float | None:
        return None  # not forwarded by Ray's proxy; an expired call reaches the service as a cancellation

    def invocation_metadata(self):
        return self.ray.invocation_metadata()

    def set_trailing_metadata(self, metadata) -> None:
        self.ray.set_trailing_metadata(list(metadata))

    def abort(self, code: grpc.StatusCode, details: str):
        self.ray.set_code(code)
        self.ray.set_details(details)
        raise Aborted(code, details)


# -- the deployment ------------------------------------------------------------------------------------------------
class GenerationDeployment:
    """One replica: a GenerationService of its own, built from the config file and flags every replica shares."""

    def __init__(self, config_path: str | None, overrides: dict):
        from .app import BearerAuth
        from .service import GenerationService
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cfg = configure(config_path, overrides)
        check_ray_security(cfg)
        cfg.metrics_port = None  # the replica's metrics go out through Ray (RayMetrics), not a port of its own
        self.cfg = cfg
        self.metrics = RayMetrics()
        self.service = GenerationService(cfg, self.metrics)
        tokens = cfg.tokens()
        self.auth = BearerAuth(tokens, self.metrics) if tokens else None
        # the service's handlers block (they wait on a worker thread): one thread per request a replica admits
        self.pool = futures.ThreadPoolExecutor(max_workers=cfg.workers + cfg.queue_size + 2,
                                               thread_name_prefix="irece-ray-handler")
        self.replica = serve.get_replica_context().replica_tag
        self.service.warm_up()
        log.info("replica %s ready (config %s)", self.replica, config_path)

    def _context(self, request, grpc_context, method: str) -> RayContext:
        ctx = RayContext(grpc_context)
        ctx.set_trailing_metadata([(REPLICA_HEADER, self.replica)])
        if self.auth is not None and not self.auth.valid(dict(ctx.invocation_metadata()).get("authorization")):
            self.metrics.auth_failures.inc()
            self.metrics.finished("unknown", grpc.StatusCode.UNAUTHENTICATED.name, method, 0.0)
            ctx.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid bearer token is required")
        if request.ByteSize() > self.cfg.max_message_bytes:  # what gRPC's own limit says on one server
            ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"request larger than max_message_bytes ({self.cfg.max_message_bytes})")
        return ctx

    async def _in_thread(self, ctx: RayContext, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except asyncio.CancelledError:  # the client went away (or its deadline passed): stop the work
            ctx.cancel()
            raise

    async def Generate(self, request, grpc_context):
        ctx = self._context(request, grpc_context, "Generate")
        return await self._in_thread(ctx, self.service.Generate, request, ctx)

    async def GenerateStream(self, request, grpc_context):
        ctx = self._context(request, grpc_context, "GenerateStream")
        events = self.service.GenerateStream(request, ctx)
        try:
            while (event := await self._in_thread(ctx, next, events, None)) is not None:
                yield event
        finally:  # ends early when the client does: the service's guard sees an inactive call
            ctx.cancel()

    async def Check(self, request, grpc_context):
        if request.service not in ("", SERVICE_NAME):
            RayContext(grpc_context).abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:64]!r}")
        serving = not self.service.draining.is_set()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if serving
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    def __del__(self):  # Ray's graceful shutdown, after graceful_shutdown_timeout_s: abort what still runs
        service = getattr(self, "service", None)
        if service is not None:
            service.drain(0)
            self.pool.shutdown(wait=False, cancel_futures=True)


def check_ray_security(cfg: ServerConfig) -> None:
    """Refuse to start rather than serve less securely than configured: Ray's gRPC proxy has no TLS and listens on
    every interface."""
    if cfg.tls_cert or cfg.tls_key:
        raise ValueError("tls_cert/tls_key cannot apply under --ray: Ray Serve's gRPC proxy serves plaintext only. "
                         "Terminate TLS in front of it (a load balancer, Envoy) and remove them (refusing to start "
                         "without TLS)")
    if cfg.tokens() and not cfg.insecure:
        raise ValueError("under --ray bearer tokens reach Ray's gRPC proxy in clear (no TLS, every interface): "
                         "terminate TLS in front of it and set insecure = true (--insecure) to say so")
    cfg.check_security()


def deployment_options(cfg: ServerConfig, replicas: int, max_replicas: int | None, replica_cpus: float,
                       router_queue: int | None = None) -> dict:
    """A replica takes workers + queue_size requests, as one server admits. Ray's router counts every request as
    queued until a replica takes it (a burst is all "queued" at once), so its bound defaults to the deployment's
    whole capacity: a burst that size is never refused while replicas have room; past capacity + that,
    RESOURCE_EXHAUSTED at once. -1: no bound (requests wait for a replica, e.g. while autoscaling adds one)."""
    capacity = cfg.workers + cfg.queue_size
    if router_queue is None:
        router_queue = capacity * max(replicas, max_replicas or 0)
    opts = dict(max_ongoing_requests=capacity, max_queued_requests=router_queue,
                graceful_shutdown_timeout_s=cfg.drain_seconds, ray_actor_options={"num_cpus": replica_cpus})
    if max_replicas is not None and max_replicas > replicas:
        opts["autoscaling_config"] = {"min_replicas": replicas, "initial_replicas": replicas,
                                      "max_replicas": max_replicas, "target_ongoing_requests": cfg.workers}
    else:
        opts["num_replicas"] = replicas
    return opts


def application(config: str | Path | None = None, overrides: dict | None = None, replicas: int = 1,
                max_replicas: int | None = None, replica_cpus: float = 1.0, router_queue: int | None = None):
    """The Ray Serve application: checks the configuration here, before any replica starts."""
    overrides = dict(overrides or {})
    cfg = configure(config, overrides)
    check_ray_security(cfg)
    path = str(Path(config).resolve()) if config else None  # every replica reads this file (shared or baked in)
    deployment = serve.deployment(GenerationDeployment, name=DEPLOYMENT_NAME)
    opts = deployment_options(cfg, replicas, max_replicas, replica_cpus, router_queue)
    return deployment.options(**opts).bind(path, overrides)


def build_app(args: dict):
    """Application builder for `serve run` / `serve deploy` (deploy/ray-serve.yaml): args config, overrides,
    replicas, max_replicas, replica_cpus, router_queue."""
    return application(args.get("config"), args.get("overrides"), int(args.get("replicas", 1)),
                       args.get("max_replicas"), float(args.get("replica_cpus", 1.0)), args.get("router_queue"))


def grpc_options(port: int) -> gRPCOptions:
    return gRPCOptions(port=port, grpc_servicer_functions=SERVICER_FUNCTIONS)


# -- starting and stopping -----------------------------------------------------------------------------------------
@dataclass
class RayServer:
    address: str  # gRPC target of the proxy on this node
    metrics_port: int | None  # this node's Ray metrics agent (Prometheus), when Ray was started here
    started_ray: bool

    def stop(self) -> None:
        serve.shutdown()
        if self.started_ray:
            ray.shutdown()


def start_ray_server(config: str | Path | None = None, replicas: int = 2, port: int | None = None, *,
                     overrides: dict | None = None, max_replicas: int | None = None, address: str | None = None,
                     replica_cpus: float = 1.0, router_queue: int | None = None, num_cpus: int | None = None,
                     metrics_export_port: int | None = None, object_store_memory: int = 200 * 1024 * 1024,
                     metrics_report_ms: int | None = None, log_to_driver: bool = True) -> RayServer:
    """Deploy the service on Ray (a local instance, or the cluster at `address`) and return once every replica is
    warm. `port` overrides the config's port (Ray's gRPC proxy listens there); `stop()` undoes it all. A local
    instance: `num_cpus` (default: Ray's count), Ray's metrics agent on `metrics_export_port` (default: any free
    port, in `.metrics_port`), reporting every `metrics_report_ms` (Ray's default 10 s)."""
    overrides = dict(overrides or {})
    if port is not None:
        overrides["port"] = port
    cfg = configure(config, overrides)
    app = application(config, overrides, replicas, max_replicas, replica_cpus, router_queue)  # refuses before Ray starts
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            # the proxy refuses what one server would (read by Ray's processes when they start)
            os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(cfg.max_message_bytes))
            system = {"metrics_report_interval_ms": metrics_report_ms} if metrics_report_ms else None
            ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_memory,
                     _metrics_export_port=metrics_export_port, _system_config=system, log_to_driver=log_to_driver)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, grpc_options=grpc_options(cfg.port))
        serve.run(app, name=APP_NAME)  # gRPC routes to the one application (HTTP: only on 127.0.0.1)
    except BaseException:
        serve.shutdown()
        if started:
            ray.shutdown()
        raise
    metrics_port = None
    if started and not address:
        metrics_port = ray.nodes()[0].get("MetricsExportPort")
    return RayServer(f"127.0.0.1:{cfg.port}", metrics_port, started)


def serve_on_ray(config: str | None, overrides: dict, replicas: int = 1, max_replicas: int | None = None,
                 address: str | None = None, replica_cpus: float = 1.0, router_queue: int | None = None,
                 metrics_export_port: int | None = None) -> None:
    """`irece serve --ray`: deploy, serve until SIGTERM/SIGINT, then take it all down (Ray drains each replica)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = configure(config, overrides)
    if metrics_export_port is None:
        metrics_export_port = cfg.metrics_port
    server = start_ray_server(config, replicas, overrides=overrides, max_replicas=max_replicas, address=address,
                              replica_cpus=replica_cpus, router_queue=router_queue,
                              metrics_export_port=metrics_export_port)
    log.info("serving %s on Ray: %d replica(s) (max %s) behind the gRPC proxy at %s; metrics at :%s/metrics",
             SERVICE_NAME, replicas, max_replicas or replicas, server.address, server.metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    log.info("stopping: Ray drains each replica (up to %g s)", cfg.drain_seconds)
    server.stop()
