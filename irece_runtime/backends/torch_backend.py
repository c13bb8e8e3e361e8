"""The reference backend: the components as diffusers/transformers modules in torch (CPU or CUDA)."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoints
from ..components import build_components
from . import BackendLimits, check_model


class TorchBackend:
    def __init__(self, model_dir: str | Path, erased: str | Path | None = None,
                 layers: tuple[str, ...] | None = None, device: str = "cpu", dtype=torch.float32):
        modules, cfg = build_components(model_dir, erased, layers, dtype, separate_localizer=False)
        self.modules = {k: m.to(device).eval() for k, m in modules.items()}
        self.device, self.dtype = torch.device(device), dtype
        self.text_encoder = self.modules["text_encoder"].te
        self.vae = self.modules["vae_decoder"].vae
        self.localizer = self.modules["localizer"]
        self.unets = {"standard": self.modules["unet_standard"].unet, "erased": self.modules["unet_erased"].unet}
        self.embed_dim, self.latent_channels = cfg["embed_dim"], cfg["latent_channels"]
        self.vae_scale_factor, self.scaling_factor = cfg["vae_scale_factor"], cfg["scaling_factor"]
        self.limits = BackendLimits()  # any batch, any latent size the UNet's downsampling divides
        for m in (*self.unets.values(), self.vae):  # stop points between blocks (time limits, cancellation)
            checkpoints.install(m)

    @torch.no_grad()
    def embed_tokens(self, input_ids):
        return self.text_encoder.get_input_embeddings()(input_ids.to(self.device))

    @torch.no_grad()
    def encode_text(self, token_embeds):
        return self.modules["text_encoder"](token_embeds.to(self.device, self.dtype))

    @torch.no_grad()
    def eps(self, model, sample, timestep, hidden):
        return self.modules[f"unet_{check_model(model)}"](sample, timestep, hidden)

    @torch.no_grad()
    def concept_map(self, sample, timestep, hidden, token_weights):
        return self.localizer(sample, timestep, hidden, token_weights.to(sample.device, sample.dtype))

    @torch.no_grad()
    def concept_head(self, sample, timestep, hidden):
        if "concept_head" not in self.modules:
            raise ValueError("this model folder has no concept_head/ (train one with `irece head train`)")
        return self.modules["concept_head"](sample, timestep, hidden)

    @torch.no_grad()
    def vae_encode(self, images):
        return self.modules["vae_encoder"](images.to(self.device, self.dtype))

    @torch.no_grad()
    def vae_decode(self, latents):
        return self.modules["vae_decoder"](latents)


def require_torch(backend, what: str) -> TorchBackend:
    """Gradient-based attacks and erasure training need the modules themselves, which only torch has."""
    if not isinstance(backend, TorchBackend):
        raise ValueError(f"{what} needs the torch backend (it differentiates through the models); "
                         f"got {type(backend).__name__}")
    return backend
