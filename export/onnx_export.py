"""`irece export`: the text encoder (from token embeddings), VAE encoder/decoder, erased UNet, standard UNet
and the standard UNet as IRECE's localizer, to ONNX (and on to TensorRT engines, see trt_backend.py).

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
from torch import nn
from tqdm import tqdm

from irece_runtime.attention import Localizer
from irece_runtime.engines import load_unet, text_encoder_from_embeds

OPSET = 17
EXPORTER = "torchscript"
MANIFEST = "manifest.json"
COMPONENTS = ("text_encoder", "vae_encoder", "vae_decoder", "unet_erased", "unet_standard", "localizer")


class TextEncoder(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.te = text_encoder

    def forward(self, token_embeds):
        return text_encoder_from_embeds(self.te, token_embeds)


class VaeEncoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor


class VaeDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample


class UNetEps(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states).sample


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


def example_inputs(name: str, b: int, cfg: dict) -> tuple[tuple, list[str], list[str], dict]:
    D, C, h, w = cfg["embed_dim"], cfg["latent_channels"], cfg["latent_h"], cfg["latent_w"]
    f = cfg["vae_scale_factor"]
    t = torch.tensor([500.0])
    lat = torch.randn(b, C, h, w)
    hid = torch.randn(b, 77, D)
    if name == "text_encoder":
        return (hid,), ["token_embeds"], ["hidden_states"], {"token_embeds": {0: "B"}, "hidden_states": {0: "B"}}
    if name == "vae_encoder":
        return ((torch.rand(b, 3, h * f, w * f) * 2 - 1),), ["images"], ["latents"], {"images": {0: "B"}, "latents": {0: "B"}}
    if name == "vae_decoder":
        return (lat,), ["latents"], ["images"], {"latents": {0: "B"}, "images": {0: "B"}}
    if name.startswith("unet"):
        return ((lat, t, hid), ["sample", "timestep", "encoder_hidden_states"], ["noise_pred"],
                {"sample": {0: "B"}, "encoder_hidden_states": {0: "B"}, "noise_pred": {0: "B"}})
    if name == "localizer":
        tw = torch.zeros(b, 77)
        tw[:, 5] = 1.0
        return ((lat, t, hid, tw), ["sample", "timestep", "encoder_hidden_states", "token_weights"], ["concept_map"],
                {"sample": {0: "B"}, "encoder_hidden_states": {0: "B"}, "token_weights": {0: "B"},
                 "concept_map": {0: "B"}})
    raise ValueError(name)


def build_modules(model_dir: Path, erased: Path | None, layers=None) -> tuple[dict, dict]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    standard = load_unet(model_dir)
    erased_unet = load_unet(erased, model_dir) if erased else None
    loc_unet = load_unet(model_dir)  # its own copy: the localizer swaps attention processors
    modules = {"text_encoder": TextEncoder(te), "vae_encoder": VaeEncoder(vae), "vae_decoder": VaeDecoder(vae),
               "unet_erased": UNetEps(erased_unet if erased_unet is not None else standard),
               "unet_standard": UNetEps(standard), "localizer": Localizer(loc_unet, layers)}
    sample_size = standard.config.sample_size
    cfg = {"embed_dim": te.config.hidden_size, "latent_channels": vae.config.latent_channels,
           "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1), "latent_h": sample_size,
           "latent_w": sample_size, "scaling_factor": vae.config.scaling_factor}
    return modules, cfg


def export_onnx(model_dir: str | Path, erased: str | Path | None, out: str | Path, layers=None,
                max_batch: int = 2) -> dict:
    """Export every component to out/*.onnx (fp32), the token-embedding table and the manifest."""
    model_dir, out = Path(model_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    modules, cfg = build_modules(model_dir, Path(erased) if erased else None, layers)
    te = modules["text_encoder"].te
    save_file({"weight": te.get_input_embeddings().weight.detach().contiguous()},
              str(out / "token_embedding.safetensors"))
    shared = modules["unet_erased"].unet is modules["unet_standard"].unet
    components = {}
    for name in tqdm(COMPONENTS, desc="export onnx"):
        if name == "unet_erased" and shared:
            components[name] = {"file": "unet_standard.onnx"}  # no erased model: one engine serves both
            continue
        args, inputs, outputs, axes = example_inputs(name, 1, cfg)
        path = out / f"{name}.onnx"
        with torch.no_grad():
            torch.onnx.export(modules[name], args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
        components[name] = {"file": path.name, "inputs": inputs, "outputs": outputs}
    import onnx
    stats = {n: graph_stats(onnx.load(str(out / components[n]["file"]), load_external_data=False))
             for n in ("unet_standard", "localizer")}
    manifest = {
        "format": "irece-engines/1", "backend": "onnx", "precision": "fp32", "opset": OPSET, "exporter": EXPORTER,
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
