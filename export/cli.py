"""`irece export` verb."""
from __future__ import annotations

import json


def cmd_export(a):
    from .onnx_export import export_onnx
    layers = tuple(a.localizer_layers) if a.localizer_layers else None
    manifest = export_onnx(a.model, a.erased, a.out, layers=layers, max_batch=a.max_batch)
    if a.backend == "tensorrt":
        from .tensorrt_build import build_engines
        manifest = build_engines(a.out, fp16=a.fp16, max_batch=a.max_batch)
    summary = {"out": a.out, "backend": a.backend, "components": sorted(manifest["components"]),
               "graph_stats": manifest["graph_stats"], "seconds": manifest["seconds"]}
    print(json.dumps(summary) if a.json else json.dumps(summary, indent=2))


def register(sub) -> None:
    p = sub.add_parser("export", help="export ONNX graphs / TensorRT engines for the onnx and tensorrt backends")
    p.add_argument("--model", required=True, help="standard model folder (diffusers layout)")
    p.add_argument("--erased", help="erased UNet (folder or .safetensors); default: the standard UNet")
    p.add_argument("--out", required=True, help="graph folder (ONNX graphs, TensorRT engines, manifest)")
    p.add_argument("--backend", choices=("onnx", "tensorrt"), default="onnx")
    p.add_argument("--fp16", action="store_true", help="TensorRT: build fp16 engines")
    p.add_argument("--max-batch", type=int, default=2, help="largest batch the engines accept (CFG doubles it)")
    p.add_argument("--localizer-layers", nargs="+", metavar="NAME",
                   help="cross-attention layers the localizer averages (name substrings); default: all")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)
