"""Receler's erasers at inference time: a small residual adapter on every cross-attention output.

Training them is erasure/'s business; this module only rebuilds them from the saved state dict so an
erased UNet loads (and exports) with its erasers in place.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import nn

from .attention import cross_attention_layers

ERASERS_FILE = "receler_erasers.safetensors"


def erasers_path(path: str | Path) -> Path:
    """Where Receler's erasers for a UNet live: beside the folder's weights, or `<stem>.receler_erasers...` beside
    a bare state-dict file."""
    path = Path(path)
    if path.is_dir():
        return (path / "unet" if (path / "unet").is_dir() else path) / ERASERS_FILE
    return path.with_name(path.stem + "." + ERASERS_FILE)


class Eraser(nn.Module):
    """Receler's lightweight eraser: Linear(dim->rank) -> GELU -> Linear(rank->dim), up-projection zero-init."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(F.gelu(self.down(x)))


class EraserProcessor:
    """attn2 output + eraser(attn2 output). While training, it also records the eraser's energy outside the
    concept mask (Receler's concept-localized regularizer)."""

    def __init__(self, base, eraser: Eraser, state: dict):
        self.base, self.eraser, self.state = base, eraser, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if not self.state.get("enabled", True):
            return out
        delta = self.eraser(out)
        mask = self.state.get("mask")  # (B, H, W) at latent resolution
        if mask is not None:
            b, n, _ = out.shape
            H, W = mask.shape[-2:]
            s = int(round((H * W / n) ** 0.5))
            m = F.interpolate(mask[:, None], size=(H // s, W // s), mode="nearest").flatten(1)[..., None]
            self.state.setdefault("reg", []).append((delta.pow(2) * (1 - m)).mean())
        return out + delta


def install_erasers(unet, state_dict: dict | None = None, meta: dict | None = None, rank: int = 16) -> dict:
    """Wrap every attn2 with an eraser; returns the shared training state. Erasers live at unet.receler_erasers."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    rank = int((meta or {}).get("rank", rank))
    names = cross_attention_layers(unet)
    modules = dict(unet.named_modules())
    erasers = nn.ModuleDict({n.replace(".", "_"): Eraser(modules[n[: -len(".processor")]].to_out[0].out_features,
                                                         rank) for n in names})
    if state_dict:
        erasers.load_state_dict(state_dict)
    unet.receler_erasers = erasers.to(unet.dtype)
    shared: dict = {"enabled": True}
    procs = dict(unet.attn_processors)
    for n in names:
        procs[n] = EraserProcessor(AttnProcessor2_0(), erasers[n.replace(".", "_")], shared)
    unet.set_attn_processor(procs)
    unet.receler_state = shared
    return shared
