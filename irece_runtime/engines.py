"""The engine interface the denoising loop runs on, and its reference implementation over torch/diffusers.

A backend is anything with these methods (torch here; ONNX Runtime and TensorRT in export/). Tensors cross
the interface as torch CPU/CUDA tensors; latents are *scaled* (multiplied by the VAE's scaling_factor).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file

from .attention import Localizer
from .erasers import erasers_path, install_erasers

MODELS = ("erased", "standard")


class Engines(Protocol):
    device: torch.device | str  # where the engines' outputs live
    embed_dim: int  # width of the text encoder's token embeddings
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 77) int64 -> (B, 77, D) token embeddings (no positions)."""

    def encode_text(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 77, D) token embeddings -> (B, 77, D) text encoder hidden states."""

    def eps(self, model: str, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Noise prediction of the 'erased' or the 'standard' UNet."""

    def concept_map(self, sample, timestep, hidden, token_weights) -> torch.Tensor:
        """The standard UNet's aggregated cross-attention map on the weighted tokens: (B, H, W)."""

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [-1, 1] -> scaled latent (posterior mean)."""

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latent -> (B, 3, h, w) in [-1, 1] (not clamped)."""


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


class TorchEngines:
    """Reference backend: diffusers/transformers modules in torch (CPU or CUDA)."""

    def __init__(self, model_dir: str | Path, erased: str | Path | None = None,
                 layers: tuple[str, ...] | None = None, device: str = "cpu", dtype=torch.float32):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        model_dir = Path(model_dir)
        self.device, self.dtype = torch.device(device), dtype
        self.text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=dtype).to(device).eval()
        self.vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=dtype).to(device).eval()
        standard = load_unet(model_dir, dtype=dtype).to(device)
        self.localizer = Localizer(standard, layers)
        self.unets = {"standard": standard,
                      "erased": load_unet(erased, model_dir, dtype).to(device) if erased else standard}
        self.embed_dim = self.text_encoder.config.hidden_size
        self.latent_channels = self.vae.config.latent_channels
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = self.vae.config.scaling_factor

    @torch.no_grad()
    def embed_tokens(self, input_ids):
        return self.text_encoder.get_input_embeddings()(input_ids.to(self.device))

    @torch.no_grad()
    def encode_text(self, token_embeds):
        return text_encoder_from_embeds(self.text_encoder, token_embeds.to(self.device, self.dtype))

    @torch.no_grad()
    def eps(self, model, sample, timestep, hidden):
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        return self.unets[model](sample, timestep, hidden).sample

    @torch.no_grad()
    def concept_map(self, sample, timestep, hidden, token_weights):
        return self.localizer(sample, timestep, hidden, token_weights.to(sample.device, sample.dtype))

    @torch.no_grad()
    def vae_encode(self, images):
        return self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def vae_decode(self, latents):
        return self.vae.decode(latents / self.scaling_factor).sample
