# GPU deployment of the IRECE generation server (ONNX Runtime CUDA or TensorRT backend).
# Build:  docker build -t irece .
# Run:    docker run --gpus all -p 50051:50051 -p 9464:9464 -v /models/sd14:/models/sd14:ro \
#           -v /models/erased:/models/erased:ro -v irece-engines:/engines irece \
#           --model /models/sd14 --erased /models/erased --concept "cat" --backend tensorrt --graphs /engines
# Engines are built at start when /engines has none for this GPU and TensorRT version (docker/entrypoint.sh),
# or mounted prebuilt.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 irece
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
COPY docker/entrypoint.sh /entrypoint.sh

# torch==2.13.0 from PyPI is the CUDA build; the gpu extra adds onnxruntime-gpu, tensorrt and nvidia-ml-py
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install '.[gpu]' \
    && mkdir -p /engines && chown irece /engines && chmod +x /entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH

USER irece
EXPOSE 50051 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
ch=grpc.insecure_channel('127.0.0.1:50051'); \
sys.exit(0 if g.HealthStub(ch).Check(h.HealthCheckRequest(service='irece.v1.Generation'), timeout=4).status==1 else 1)"
ENTRYPOINT ["/entrypoint.sh"]
CMD ["--help"]
