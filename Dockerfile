# GPU deployment of the IRECE generation server (ONNX Runtime CUDA or TensorRT backend).
# Build:  docker build -t irece .
# Run:    docker run --gpus all -p 50051:50051 -p 9464:9464 -v /models/sd14:/models/sd14:ro \
#           -v /models/erased:/models/erased:ro -v irece-engines:/engines irece \
#           --model /models/sd14 --erased /models/erased --concept "cat" --backend tensorrt --graphs /engines
#         or the same from a config file: ... irece --config /config/server.toml (model, erased, backend, graphs,
#         port, TLS: docker/entrypoint.py reads it as `irece serve` does)
# Engines are built at start when /engines has none for this GPU and TensorRT version (docker/entrypoint.py), or
# mounted prebuilt. Kubernetes: deploy/k8s/. Lint: hadolint Dockerfile (clean).
# CUDA 13: PyPI's torch 2.13.0, onnxruntime-gpu 1.31.1 and the pinned tensorrt-cu13 are CUDA 13 builds.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# python3-venv of Ubuntu 24.04's Python 3.12.3, any of its security revisions
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv=3.12.3-* \
    && rm -rf /var/lib/apt/lists/*

# a numeric user and group (runAsNonRoot can verify them): 10001
RUN groupadd --gid 10001 irece && useradd --uid 10001 --gid 10001 --create-home irece
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY irece_runtime irece_runtime
COPY irece_cli irece_cli
COPY miniworld miniworld
COPY erasure erasure
COPY export export
COPY server server
COPY benchmarks benchmarks
COPY protos protos
COPY docker docker

# the gpu extra: onnxruntime-gpu (the only ONNX Runtime wheel in the image), tensorrt-cu13, nvidia-ml-py, pinned
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir '.[gpu]' \
    && mkdir -p /engines /tmp/irece && chown 10001:10001 /engines /tmp/irece
ENV PATH=/opt/venv/bin:$PATH IRECE_RUN_DIR=/tmp/irece

USER 10001:10001
EXPOSE 50051 9464
# grpc.health.v1 on the port and TLS of the config the server was started with (docker/entrypoint.py wrote them)
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]
ENTRYPOINT ["python", "/app/docker/entrypoint.py"]
CMD ["--help"]
