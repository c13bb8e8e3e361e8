"""`irece export`: the text encoder (from token embeddings), VAE encoder/decoder, erased UNet, standard UNet
and the standard UNet as IRECE's localizer, to ONNX (and on to TensorRT engines, see tensorrt_build.py).

Exporter: the TorchScript exporter (`dynamo=False`) at opset 17, chosen explicitly (torch >= 2.9 defaults to
dynamo): it traces diffusers' UNet, SDPA included, with dynamic batch and no graph breaks. Spatial sizes are
static per engine folder (as in TensorRT's diffusion demo); batch is dynamic.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from irece_runtime.backends.graph import FORMAT, MANIFEST
from irece_runtime.components import COMPONENTS, OPTIONAL, build_components, component_io

OPSET = 17
EXPORTER = "torchscript"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_hashes(model_dir: Path, erased: Path | None) -> dict:
    files = sorted(model_dir.rglob("*.safetensors"))
    out = {str(f.relative_to(model_dir)): sha256(f) for f in files}
    if erased:
        erased = Path(erased)
        for f in sorted(erased.rglob("*.safetensors")) if erased.is_dir() else [erased]:
            out[f"erased/{f.name}"] = sha256(f)
    return out


def export_onnx(model_dir: str | Path, erased: str | Path | None, out: str | Path, layers=None,
                max_batch: int = 2) -> dict:
    """Export every component to out/*.onnx (fp32), the token-embedding table and the manifest."""
    model_dir, out = Path(model_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    modules, cfg = build_components(model_dir, Path(erased) if erased else None, layers)
    te = modules["text_encoder"].te
    save_file({"weight": te.get_input_embeddings().weight.detach().contiguous()},
              str(out / "token_embedding.safetensors"))
    shared = modules["unet_erased"].unet is modules["unet_standard"].unet
    components = {}
    for name in tqdm([c for c in COMPONENTS + OPTIONAL if c in modules], desc="export onnx"):
        if name == "unet_erased" and shared:
            components[name] = {"file": "unet_standard.onnx"}  # no erased model: one engine serves both
            continue
        args, inputs, outputs, axes = component_io(name, 1, cfg)
        path = out / f"{name}.onnx"
        _export_one(modules[name], args, inputs, outputs, axes, path)
        components[name] = {"file": path.name, "inputs": inputs, "outputs": outputs}
    import onnx
    stats = {n: graph_stats(onnx.load(str(out / components[n]["file"]), load_external_data=False))
             for n in ("unet_standard", "localizer")}
    manifest = {
        "format": FORMAT, "backend": "onnx", "precision": "fp32", "opset": OPSET, "exporter": EXPORTER,
        "model_dir": str(model_dir), "erased": str(erased) if erased else None,
        "source_sha256": model_hashes(model_dir, Path(erased) if erased else None),
        "shapes": {"latent": [cfg["latent_channels"], cfg["latent_h"], cfg["latent_w"]], "tokens": 77,
                   "embed_dim": cfg["embed_dim"], "batch": [1, max_batch]},
        "config": cfg, "localizer_layers": modules["localizer"].layer_names, "components": components,
        "graph_stats": stats,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": _ort_version(),
                     "python": platform.python_version()},
        "seconds": round(time.time() - t0, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _export_one(module, args, inputs, outputs, axes, path: Path) -> None:
    """One graph to `path`. A graph over protobuf's 2 GB (SD v1.4's UNet in fp32) keeps its weights outside;
    the exporter names those files after the initializers, which collide between graphs of one folder, so it
    exports into a folder of its own and the weights are re-saved as one `<name>.onnx.data` beside the graph."""
    import shutil
    import tempfile

    import onnx
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        with torch.no_grad():
            torch.onnx.export(module, args, str(staged), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        if len(list(Path(tmp).iterdir())) == 1:  # small graph: weights inside
            shutil.move(str(staged), path)
        else:
            onnx.save_model(onnx.load(str(staged)), str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data.name, size_threshold=1024)


def graph_stats(model) -> dict:
    """Node count and multiply-accumulate estimate of the graph's Conv/MatMul/Gemm nodes (shape-inferred)."""
    from onnx import shape_inference
    g = shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {i.name: list(i.dims) for i in g.initializer}
    shapes.update(inits)
    macs = 0
    ops: dict = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        out = shapes.get(n.output[0])
        if out is None:
            continue
        if n.op_type == "Conv" and n.input[1] in shapes:
            w = shapes[n.input[1]]
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type in ("MatMul", "Gemm") and shapes.get(n.input[0]):
            macs += int(np.prod(out)) * int(shapes[n.input[0]][-1])
    return {"nodes": len(g.node), "conv": ops.get("Conv", 0), "matmul": ops.get("MatMul", 0) + ops.get("Gemm", 0),
            "macs": macs}


def _ort_version() -> str | None:
    try:
        import onnxruntime
        return onnxruntime.__version__
    except ImportError:
        return None
