"""Attention processors: the one place cross-attention maps come out of a UNet (and Receler's erasers go in).

`ConceptMapProcessor` is a drop-in for diffusers' AttnProcessor2_0 on a cross-attention layer (attn2).
While a `MapStore` holds token weights it computes the attention probabilities explicitly and records,
per layer, the head-mean probability mass on the weighted (concept) tokens; otherwise it runs the stock
fused kernel, so a standard UNet with these processors installed still predicts noise bit-for-bit.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
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


class PropagationStore(threading.local):
    """Shared between the self-attention processors of one UNet: the maps to propagate, and the results so far."""

    def __init__(self):
        self.maps: torch.Tensor | None = None  # (B, h*w, K): maps at the latent's resolution
        self.out: list[torch.Tensor] = []


class PropagationProcessor:
    """A drop-in for AttnProcessor2_0 on a self-attention layer (attn1). It always runs the stock fused kernel, so
    the noise prediction is unchanged; while its store holds maps at this layer's resolution it also records each
    cell's map averaged over the cells it attends to (head mean of softmax(qk) @ maps), computed by the same fused
    kernel with the maps as values: no (h*w)^2 matrix is kept (SD v1.4 has 4,096 cells)."""

    def __init__(self, store: PropagationStore):
        self.store = store
        self.fused = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        maps = self.store.maps
        if maps is not None and encoder_hidden_states is None and hidden_states.dim() == 3 \
                and hidden_states.shape[1] == maps.shape[1]:
            b = hidden_states.shape[0]
            d = attn.to_q.out_features // attn.heads
            q, k = (f(hidden_states).view(b, -1, attn.heads, d).transpose(1, 2) for f in (attn.to_q, attn.to_k))
            v = maps[:, None].expand(-1, attn.heads, -1, -1).to(q.dtype)
            self.store.out.append(F.scaled_dot_product_attention(q, k, v, scale=attn.scale).mean(1))  # (B, h*w, K)
        return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class SelfAttentionPropagation(nn.Module):
    """The standard UNet's self-attention as an affinity between cells (DiffSeg, Tian et al., CVPR 2024, groups
    cells by it): (sample, timestep, hidden, maps (B, K, h, w)) -> maps (B, K, h, w), each cell's value the mean
    over the latent-resolution self-attention layers of the values of the cells it attends to. A cell of an object
    attends to the rest of that object, so a map that marks part of an object spreads over all of it."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        procs = dict(unet.attn_processors)  # the other processors (the localizer's attn2) stay as they are
        ours = [p for p in procs.values() if isinstance(p, PropagationProcessor)]
        self.unet, self.store = unet, ours[0].store if ours else PropagationStore()  # a second one shares the first's
        for name in procs:
            if name.endswith("attn1.processor"):
                procs[name] = PropagationProcessor(self.store)
        unet.set_attn_processor(procs)

    def forward(self, sample, timestep, encoder_hidden_states, maps):
        b, k, h, w = maps.shape
        self.store.maps, self.store.out = maps.flatten(2).transpose(1, 2), []
        try:
            self.unet(sample, timestep, encoder_hidden_states)
            if not self.store.out:
                raise ValueError(f"the UNet has no self-attention layer at the latent's resolution {h}x{w}")
            return torch.stack(self.store.out).mean(0).transpose(1, 2).reshape(b, k, h, w)
        finally:
            self.store.maps, self.store.out = None, []
