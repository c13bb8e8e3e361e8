"""The image's HEALTHCHECK: grpc.health.v1 Check of irece.v1.Generation where the entry point (docker/entrypoint.py)
said the server answers, with the same port and TLS as the config it serves with. Exit 0 when SERVING, 1 otherwise.
Light on purpose (grpc only, no model code): it runs every 30 s beside the server."""
import json
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

RUN_DIR = Path(os.environ.get("IRECE_RUN_DIR", "/tmp/irece"))
SERVICE = "irece.v1.Generation"


def check(address: str, tls_cert: str | None, timeout: float = 4.0) -> bool:
    if tls_cert:  # the server's own (self-signed) certificate as the root; the name it was issued for
        creds = grpc.ssl_channel_credentials(Path(tls_cert).read_bytes())
        name = os.environ.get("IRECE_HEALTH_TLS_NAME", "localhost")
        channel = grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                              timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    target = json.loads((RUN_DIR / "health.json").read_text())
    sys.exit(0 if check(target["address"], target["tls_cert"]) else 1)
