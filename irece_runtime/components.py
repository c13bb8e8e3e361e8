"""The model's components as the runtime calls them, defined once for the torch backend and the exporter alike.

Each wrapper is one graph of an exported folder (text encoder from token embeddings, VAE encoder/decoder,
noise prediction, the localizer); `component_io` names and shapes their inputs and outputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from . import irece
from .attention import Localizer
from .concept_head import HeadedUNet, load_head
from .erasers import erasers_path, install_erasers

COMPONENTS = ("text_encoder", "vae_encoder", "vae_decoder", "unet_erased", "unet_standard", "localizer")
OPTIONAL = ("concept_head",)  # built where the model folder has one (concept_head/: the head gate)


def text_encoder_from_embeds(text_encoder, token_embeds: torch.Tensor) -> torch.Tensor:
    """Run a transformers CLIPTextModel from token embeddings (so learned vectors need no vocabulary change).

    Same result as text_encoder(input_ids).last_hidden_state when the embeddings are the vocabulary's.
    """
    tm = getattr(text_encoder, "text_model", text_encoder)  # transformers < 5 nests the transformer
    h = tm.embeddings(inputs_embeds=token_embeds)
    n = h.shape[1]
    causal = torch.full((n, n), float("-inf"), dtype=h.dtype, device=h.device).triu(1)[None, None]
    return tm.final_layer_norm(tm.encoder(inputs_embeds=h, attention_mask=causal).last_hidden_state)


def load_unet(path: str | Path, base_config_dir: str | Path | None = None, dtype=torch.float32):
    """An erased or standard UNet from a diffusers folder (model dir or its unet/), or a safetensors state dict
    of the SD UNet (then base_config_dir supplies the architecture). Receler erasers saved beside are installed."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    if path.is_dir() and (path / "unet").is_dir():
        path = path / "unet"
    if path.is_dir():
        unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=dtype)
    elif path.suffix == ".safetensors":
        if base_config_dir is None:
            raise ValueError(f"{path}: a bare UNet state dict needs the base model folder for its config")
        base = Path(base_config_dir)
        base = base / "unet" if (base / "unet").is_dir() else base
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base)).to(dtype)
        state = load_file(str(path))
        missing, unexpected = unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: not a UNet2DConditionModel state dict for this architecture "
                             f"({len(missing)} missing keys, {len(unexpected)} unexpected, e.g. "
                             f"{(missing + unexpected)[:3]})")
    else:
        raise ValueError(f"{path}: expected a diffusers UNet folder or a .safetensors file")
    erasers = erasers_path(path)
    if erasers.exists():
        install_erasers(unet, load_file(str(erasers)), json.loads(
            (erasers.with_suffix(".json")).read_text()) if erasers.with_suffix(".json").exists() else {})
    return unet.eval()


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


def component_io(name: str, b: int, cfg: dict) -> tuple[tuple, list[str], list[str], dict]:
    D, C, h, w = cfg["embed_dim"], cfg["latent_channels"], cfg["latent_h"], cfg["latent_w"]
    f = cfg["vae_scale_factor"]
    t = torch.full((b,), 500.0)  # one timestep per sample: rows of a batched call may sit at different steps
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
                {"sample": {0: "B"}, "timestep": {0: "B"}, "encoder_hidden_states": {0: "B"}, "noise_pred": {0: "B"}})
    if name == "localizer":
        tw = torch.zeros(b, 2, 77)  # K = 2 token sets at export; K is a dynamic axis
        tw[:, 0, 5] = tw[:, 1, 7] = 1.0
        return ((lat, t, hid, tw), ["sample", "timestep", "encoder_hidden_states", "token_weights"], ["concept_map"],
                {"sample": {0: "B"}, "timestep": {0: "B"}, "encoder_hidden_states": {0: "B"},
                 "token_weights": {0: "B", 1: "K"}, "concept_map": {0: "B", 1: "K"}})
    if name == "concept_head":  # the standard UNet with the null prompt -> per-cell concept probabilities
        return ((lat, t, hid), ["sample", "timestep", "encoder_hidden_states"], ["concept_probs"],
                {"sample": {0: "B"}, "timestep": {0: "B"}, "encoder_hidden_states": {0: "B"},
                 "concept_probs": {0: "B"}})
    raise ValueError(name)


def build_components(model_dir: str | Path, erased: str | Path | None = None, layers=None, dtype=torch.float32,
                     separate_localizer: bool = True) -> tuple[dict, dict]:
    """Every component of a model folder (plus an erased UNet) as modules, and the shape facts the runtime
    needs. The localizer gets its own UNet copy for export (its processors differ); the torch backend shares the
    standard UNet with it (`separate_localizer=False`: the processors predict noise bit-for-bit when idle)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    model_dir = Path(model_dir)
    te = CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=dtype).eval()
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=dtype).eval()
    standard = load_unet(model_dir, dtype=dtype)
    erased_unet = load_unet(erased, model_dir, dtype) if erased else standard
    loc_unet = load_unet(model_dir, dtype=dtype) if separate_localizer else standard
    modules = {"text_encoder": TextEncoder(te), "vae_encoder": VaeEncoder(vae), "vae_decoder": VaeDecoder(vae),
               "unet_erased": UNetEps(erased_unet), "unet_standard": UNetEps(standard),
               "localizer": Localizer(loc_unet, layers)}
    head = load_head(model_dir)
    if head is not None:  # its own UNet copy for export, like the localizer (its hooks only record in its pass)
        head_unet = load_unet(model_dir, dtype=dtype) if separate_localizer else standard
        modules["concept_head"] = HeadedUNet(head_unet, head[0].to(dtype), tuple(head[1]["blocks"]))
    sample_size = standard.config.sample_size
    cfg = {"embed_dim": te.config.hidden_size, "latent_channels": vae.config.latent_channels,
           "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1), "latent_h": sample_size,
           "latent_w": sample_size, "scaling_factor": vae.config.scaling_factor}
    return modules, cfg
