"""The backend interface the denoising loop runs on. A backend is anything with these methods: torch
(`torch_backend`), ONNX Runtime over exported graphs (`onnxruntime_backend`), TensorRT engines built from them
(`tensorrt_backend`). Tensors cross it as torch tensors; latents are *scaled* (times the VAE's scaling_factor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

MODELS = ("erased", "standard")


@dataclass(frozen=True)
class BackendLimits:
    """What a backend can run at all; request validation refuses the rest up front.
    max_batch: images per engine call before CFG doubles it (None: unbounded);
    latent_size: (h, w) the graphs were built for (None: any multiple of the UNet's downsampling)."""
    max_batch: int | None = None
    latent_size: tuple[int, int] | None = None

    def check(self, batch: int, latent_h: int, latent_w: int) -> None:
        if self.max_batch is not None and batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds this backend's maximum of {self.max_batch}")
        if self.latent_size is not None and (latent_h, latent_w) != tuple(self.latent_size):
            raise ValueError(f"latent size {latent_h}x{latent_w} differs from the {self.latent_size[0]}x"
                             f"{self.latent_size[1]} this backend's graphs were built for")


class Backend(Protocol):
    device: torch.device | str  # where the backend's outputs live
    embed_dim: int  # width of the text encoder's token embeddings
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    limits: BackendLimits

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 77) int64 -> (B, 77, D) token embeddings (no positions)."""

    def encode_text(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 77, D) token embeddings -> (B, 77, D) text encoder hidden states."""

    def eps(self, model: str, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Noise prediction of the 'erased' or the 'standard' UNet."""

    def concept_map(self, sample, timestep, hidden, token_weights) -> torch.Tensor:
        """The standard UNet's aggregated cross-attention maps on weighted token sets, one pass:
        token_weights (B, 77) -> (B, H, W), or (B, K, 77) -> (B, K, H, W)."""

    def concept_head(self, sample, timestep, hidden) -> torch.Tensor:
        """The concept head on the standard UNet's features (hidden: the null prompt's) -> (B, K, H, W)
        probabilities, K the head's concepts (concept_head.py); a model folder without a head refuses."""

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [-1, 1] -> scaled latent (posterior mean)."""

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latent -> (B, 3, h, w) in [-1, 1] (not clamped)."""


def check_model(model: str) -> str:
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return model
