"""`irece serve`: the gRPC server around GenerationService (health, reflection, auth, TLS, metrics, drain)."""
from __future__ import annotations

import hmac
import logging
import os
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from protos.irece.v1 import generation_pb2 as pb
from protos.irece.v1 import generation_pb2_grpc as pb_grpc

from .config import ServerConfig
from .metrics import Metrics
from .service import GenerationService

log = logging.getLogger("irece.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class BearerAuth(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on Generation calls (health and reflection stay open); refusals
    are counted, so that guessing shows on the dashboards."""

    def __init__(self, tokens: list[str], metrics: Metrics):
        self.tokens = [f"Bearer {t}".encode() for t in tokens]

        def denier(method: str):
            def deny(request, context):  # the request stays raw bytes: nothing is parsed for an unknown caller
                t0 = time.perf_counter()
                metrics.auth_failures.inc()
                metrics.finished("unknown", grpc.StatusCode.UNAUTHENTICATED.name, method, time.perf_counter() - t0)
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid bearer token is required")
            return deny

        self.deny = grpc.unary_unary_rpc_method_handler(denier("Generate"))
        self.deny_stream = grpc.unary_stream_rpc_method_handler(denier("GenerateStream"))

    def valid(self, header: str | None) -> bool:
        given = (header or "").encode()
        return any([hmac.compare_digest(given, t) for t in self.tokens])  # all compared: no early exit to time

    def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{SERVICE_NAME}/"):
            return continuation(details)
        if self.valid(dict(details.invocation_metadata).get("authorization")):
            return continuation(details)
        return self.deny_stream if details.method.endswith("Stream") else self.deny


class Server:
    def __init__(self, cfg: ServerConfig, service: GenerationService | None = None, metrics: Metrics | None = None):
        cfg.check_security()  # before loading the model: refuse to start rather than serve less securely
        cfg.check_serving()
        creds = None
        if cfg.tls_cert:  # both or neither (check_security); read now, so a missing file fails before the model loads
            with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.service = service or GenerationService(cfg, self.metrics)
        capacity = self.service.admission.capacity
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes)]
        tokens = cfg.tokens()
        interceptors = [BearerAuth(tokens, self.metrics)] if tokens else []
        # enough handler threads that requests past capacity reach the admission check and are refused at once
        self.executor = futures.ThreadPoolExecutor(max_workers=capacity + 16, thread_name_prefix="grpc-handler")
        self.grpc = grpc.server(self.executor, options=options, interceptors=interceptors)
        pb_grpc.add_GenerationServicer_to_server(self.service, self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        addr = f"{cfg.host}:{cfg.port}"
        if creds is not None:
            self.port = self.grpc.add_secure_port(addr, creds)
        else:
            self.port = self.grpc.add_insecure_port(addr)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {addr}")
        self.health_grpc, self.health_port = None, None
        if cfg.health_port is not None:  # the same health statuses, plaintext, nothing else on that port
            self.health_grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-health"))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
            self.health_port = self.health_grpc.add_insecure_port(f"{cfg.host}:{cfg.health_port}")
            if self.health_port == 0:
                raise RuntimeError(f"cannot bind {cfg.host}:{cfg.health_port}")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics_server = None
        self.stopped = False

    def _set_health(self, status) -> None:
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def start(self, warm: bool = True) -> "Server":
        if self.cfg.metrics_port is not None:
            self.metrics_server, _ = start_http_server(self.cfg.metrics_port, addr=self.cfg.host,
                                                       registry=self.metrics.registry)
        self.grpc.start()  # health answers NOT_SERVING while warming up
        if self.health_grpc is not None:
            self.health_grpc.start()
        if warm:
            self.service.warm_up()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on port %d (metrics on %s)", SERVICE_NAME, self.port, self.cfg.metrics_port)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, new and queued requests refused at once (UNAVAILABLE), running ones get `grace`
        seconds (drain_seconds) to finish, then are aborted and their clients told UNAVAILABLE."""
        if self.stopped:
            return
        self.stopped = True
        grace = self.cfg.drain_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.service.drain(grace)
        # the service answers every call by `grace` (its handlers poll); gRPC's own cutoff, which would tell
        # clients CANCELLED, comes later and is only a backstop
        self.grpc.stop(grace + 2).wait()
        if self.health_grpc is not None:
            self.health_grpc.stop(0)
        self.service.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


EXIT_SECONDS = 2.0  # after the drain, how long threads get to end before the process exits regardless


def serve(cfg: ServerConfig, service: GenerationService | None = None) -> None:
    """Serve until SIGTERM/SIGINT, drain, and exit: the process is gone within drain_seconds + a few seconds even
    if a worker is stuck inside one engine call (a second signal exits at once)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server(cfg, service, service.metrics if service else None).start()
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            log.warning("signal %d again: exiting now", signum)
            logging.shutdown()
            os._exit(1)
        log.info("signal %d: draining (up to %g s)", signum, cfg.drain_seconds)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    server.stop()
    exit_when_idle(server, EXIT_SECONDS)


def exit_when_idle(server: Server, seconds: float) -> None:
    """Return once no request worker and no non-daemon thread is left; after `seconds`, end the process instead.
    Python joins non-daemon threads at exit, and a worker inside one long engine call cannot be interrupted, so a
    plain return could keep the process alive long after the drain."""
    deadline = time.monotonic() + seconds
    while True:
        others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
        if not others and server.service.running == 0:
            log.info("drained; exiting")
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    log.warning("exiting with %d request worker(s) and %d other thread(s) still busy after the drain",
                server.service.running, len(others))
    logging.shutdown()
    os._exit(0)
