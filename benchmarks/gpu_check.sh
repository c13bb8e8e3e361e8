#!/usr/bin/env bash
# The one GPU check (about 10 minutes on an H100): builds TensorRT engines for Shapes-10 and times the SD v1.4
# UNet architecture at random weights. Needs torch (CUDA), onnxruntime-gpu and tensorrt importable.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m protos.build >/dev/null 2>&1 || true
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py
