#!/bin/sh
# Build the graph folder (ONNX, TensorRT engines) on first start (or after a GPU / TensorRT change), then serve. Arguments go to `irece serve`.
set -eu
if [ "${1:-}" = "--help" ]; then exec irece serve --help; fi
model="" erased="" engines="" backend="torch"
prev=""
for a in "$@"; do
  case "$prev" in
    --model) model="$a" ;; --erased) erased="$a" ;; --graphs) engines="$a" ;; --backend) backend="$a" ;;
  esac
  prev="$a"
done
if [ "$backend" != "torch" ] && [ -n "$engines" ]; then
  if ! python -c "import sys; from irece_runtime.backends.tensorrt_backend import TrtBackend; TrtBackend(sys.argv[1])" "$engines" 2>/dev/null \
     && [ "$backend" = "tensorrt" ] || [ ! -f "$engines/manifest.json" ]; then
    irece export --model "$model" ${erased:+--erased "$erased"} --out "$engines" --backend "$backend" --fp16
  fi
fi
exec irece serve --host 0.0.0.0 --port 50051 --metrics-port 9464 "$@"
