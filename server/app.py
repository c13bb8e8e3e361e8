"""`irece serve`: the gRPC server around GenerationService (health, reflection, auth, TLS, metrics, drain)."""
from __future__ import annotations

import logging
import signal
import threading
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
    """Requires `authorization: Bearer <token>` on Generation calls (health and reflection stay open)."""

    def __init__(self, tokens: list[str]):
        self.tokens = {f"Bearer {t}" for t in tokens}

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid bearer token is required")

        self.deny = grpc.unary_unary_rpc_method_handler(deny)
        self.deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{SERVICE_NAME}/"):
            return continuation(details)
        if dict(details.invocation_metadata).get("authorization") in self.tokens:
            return continuation(details)
        return self.deny_stream if details.method.endswith("Stream") else self.deny


class Server:
    def __init__(self, cfg: ServerConfig, service: GenerationService | None = None, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.service = service or GenerationService(cfg, self.metrics)
        capacity = cfg.workers + cfg.queue_size
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes)]
        interceptors = [BearerAuth(cfg.auth_tokens)] if cfg.auth_tokens else []
        # enough handler threads that requests past capacity reach the admission check and are refused at once
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=capacity + 16), options=options,
                                interceptors=interceptors)
        pb_grpc.add_GenerationServicer_to_server(self.service, self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        addr = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert and cfg.tls_key:
            with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = self.grpc.add_secure_port(addr, creds)
        else:
            self.port = self.grpc.add_insecure_port(addr)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {addr}")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics_server = None

    def _set_health(self, status) -> None:
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def start(self, warm: bool = True) -> "Server":
        if self.cfg.metrics_port is not None:
            self.metrics_server, _ = start_http_server(self.cfg.metrics_port, addr=self.cfg.host,
                                                       registry=self.metrics.registry)
        self.grpc.start()  # health answers NOT_SERVING while warming up
        if warm:
            self.service.warm_up()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on port %d (metrics on %s)", SERVICE_NAME, self.port, self.cfg.metrics_port)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful drain: NOT_SERVING, refuse new RPCs, let in-flight ones finish within grace seconds."""
        self.health.enter_graceful_shutdown()
        self.grpc.stop(self.cfg.drain_seconds if grace is None else grace).wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


def serve(cfg: ServerConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server(cfg).start()
    done = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: draining (up to %.0f s)", signum, cfg.drain_seconds)
        threading.Thread(target=lambda: (server.stop(), done.set()), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
