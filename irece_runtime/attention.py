"""Attention processors: the one place cross-attention maps come out of a UNet (and Receler's erasers go in).

`ConceptMapProcessor` is a drop-in for diffusers' AttnProcessor2_0 on a cross-attention layer (attn2).
While a `MapStore` holds token weights it computes the attention probabilities explicitly and records,
per layer, the head-mean probability mass on the weighted (concept) tokens; otherwise it runs the stock
fused kernel, so a standard UNet with these processors installed still predicts noise bit-for-bit.
"""
from __future__ import annotations

import threading

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .irece import aggregate_maps


class MapStore(threading.local):
    """Shared between the processors of one UNet: what to weight, and the maps recorded so far.
    Thread-local, so a request localizing never sees another thread's plain noise prediction (or maps)."""

    def __init__(self):
        self.token_weights: torch.Tensor | None = None  # (B, K, 77): K token sets (concepts) in one pass
        self.maps: list[torch.Tensor] = []


def cross_attention_layers(unet: nn.Module, layers: tuple[str, ...] | None = None) -> list[str]:
    """Processor names of the cross-attention layers (attn2), optionally filtered by name substrings."""
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    if layers:
        names = [n for n in names if any(s in n for s in layers)]
        if not names:
            raise ValueError(f"no cross-attention layer matches {layers}")
    return names


class ConceptMapProcessor:
    def __init__(self, store: MapStore):
        self.store = store
        self.fused = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        w = self.store.token_weights
        if w is None or encoder_hidden_states is None:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        b, n, _ = hidden_states.shape  # transformer blocks hand (B, h*w, C)
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (B, heads, h*w, 77)
        self.store.maps.append(probs.mean(1) @ w.transpose(1, 2))  # (B, h*w, K): mass on each weighted token set
        out = (probs @ v).transpose(1, 2).reshape(b, n, attn.heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class Localizer(nn.Module):
    """The standard UNet as IRECE's localizer: (sample, timestep, hidden, token_weights) -> concept map (B, H, W).

    Head mean, token weighting, upsampling and the layer average all happen inside forward, so an exported
    graph hands out only the small map. The UNet keeps predicting noise normally when not localizing.
    """

    def __init__(self, unet: nn.Module, layers: tuple[str, ...] | None = None):
        super().__init__()
        self.unet = unet
        self.store = MapStore()
        names = set(cross_attention_layers(unet, layers))
        procs = dict(unet.attn_processors)
        for name in names:
            procs[name] = ConceptMapProcessor(self.store)
        unet.set_attn_processor(procs)
        self.layer_names = sorted(names)

    def forward(self, sample, timestep, encoder_hidden_states, token_weights):
        """token_weights (B, 77) -> map (B, H, W); (B, K, 77) -> maps (B, K, H, W), all K from one UNet pass."""
        single = token_weights.dim() == 2
        self.store.token_weights, self.store.maps = (token_weights[:, None] if single else token_weights), []
        try:
            self.unet(sample, timestep, encoder_hidden_states)
            maps = aggregate_maps(self.store.maps, tuple(sample.shape[-2:]))
            return maps[:, 0] if single else maps
        finally:
            self.store.token_weights, self.store.maps = None, []
