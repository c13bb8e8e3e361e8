"""The concept head: which concept each latent cell shows, read from the standard UNet's own features at t*.

A small classifier (a 1x1 convolution, a 3x3 layer that lets each cell see its neighbours, a 1x1 convolution) over
the outputs of a few UNet blocks, resized to the latent grid, in one pass of the standard UNet on x_t with the null
prompt (label-efficient segmentation on diffusion features, Baranchuk et al., ICLR 2022). Its sigmoid per concept
and cell is at once a presence score (the highest cell) and a concept-specific map (IRECE's mask: cells >= tau), so
the "head" gate costs one UNet row where the diffusion classifier costs 1 + T'(K + 1). It is trained per model
folder (`irece head train`: any SD v1.x folder, from its own generations; `irece world head`: the mini world's renders
and their ground-truth masks) and
lives beside the model's components:

    <model>/concept_head/config.json        concepts, blocks, hidden width, 3x3 layers (context), where it trained
    <model>/concept_head/head.safetensors   feature mean/std, the convolutions
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_DIR, HEAD_FILE, HEAD_CONFIG = "concept_head", "head.safetensors", "config.json"
DEFAULT_TAU = 0.2  # a head's cell probability for a mask cell where it stores none: best-measured IoU on world v4
# the first down block (its output after its downsampler), the mid block and the first two up blocks, each resized
# to the latent grid: on world v4 (8x8 latent, UNet 64/128: 384 features a cell) these give held-out presence AUC 0.96 on inverted renders and single-shape IoU
# 0.52 with an MLP head; a linear head 0.90 / 0.06 (measured on world v4, git history of BENCHMARKS.md)
FEATURE_BLOCKS = ("down_blocks.0", "mid_block", "up_blocks.0", "up_blocks.1")


class _Store(threading.local):
    """The captured block outputs of the pass in progress on this thread (None: not capturing)."""

    def __init__(self):
        self.features: dict | None = None


class UNetFeatures(nn.Module):
    """The standard UNet with forward hooks on `blocks`: forward(...) -> (noise prediction, (B, D, h, w) features
    at the input's resolution). The hooks record only while this module's forward runs, so the same UNet keeps
    serving plain noise predictions (and other threads) untouched."""

    def __init__(self, unet: nn.Module, blocks: tuple[str, ...] = FEATURE_BLOCKS):
        super().__init__()
        self.unet, self.blocks, self.store = unet, tuple(blocks), _Store()
        modules = dict(unet.named_modules())
        missing = [b for b in self.blocks if b not in modules]
        if missing:
            raise ValueError(f"the UNet has no block named {missing[0]!r}")
        for name in self.blocks:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name):
        def record(module, args, out):
            if self.store.features is not None:
                self.store.features[name] = out[0] if isinstance(out, tuple) else out
        return record

    def forward(self, sample, timestep, encoder_hidden_states):
        self.store.features = {}
        try:
            eps = self.unet(sample, timestep, encoder_hidden_states).sample
            size = tuple(sample.shape[-2:])
            feats = [self.store.features[b] for b in self.blocks]
            return eps, torch.cat([f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode="nearest")
                                   for f in feats], 1)
        finally:
            self.store.features = None


class ConceptHead(nn.Module):
    """(B, D, h, w) UNet features -> (B, K, h, w) probabilities that each cell shows each concept."""

    def __init__(self, width: int, concepts: tuple[str, ...], hidden: int = 64, context: int = 0):
        super().__init__()
        self.concepts, self.context = tuple(concepts), int(context)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        # `context` 3x3 layers let a cell see its neighbours (the coarser blocks arrive nearest-resized, in 2x2
        # blocks of equal cells); 0: every cell on its own
        mid = [m for _ in range(self.context) for m in (nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU())]
        self.net = nn.Sequential(nn.Conv2d(width, hidden, 1), nn.SiLU(), *mid, nn.Conv2d(hidden, len(concepts), 1))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean[:, None, None]) / self.std[:, None, None])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(features))


class HeadedUNet(nn.Module):
    """The concept-head graph: (sample, timestep, null hidden states) -> (B, K, h, w) concept probabilities."""

    def __init__(self, unet: nn.Module, head: ConceptHead, blocks: tuple[str, ...]):
        super().__init__()
        self.features, self.head = UNetFeatures(unet, blocks), head

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.head(self.features(sample, timestep, encoder_hidden_states)[1])


def head_config(head: ConceptHead, blocks: tuple[str, ...], trained_at: list, **extra) -> dict:
    return {"concepts": list(head.concepts), "blocks": list(blocks), "width": int(head.mean.numel()),
            "hidden": int(head.net[0].out_channels), "context": head.context, "trained_at": list(trained_at), **extra}


def save_head(model_dir: str | Path, head: ConceptHead, config: dict) -> Path:
    d = Path(model_dir) / HEAD_DIR
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(d / HEAD_FILE))
    (d / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return d


def load_head(model_dir: str | Path) -> tuple[ConceptHead, dict] | None:
    """The model folder's concept head and its config, or None where it has none."""
    d = Path(model_dir) / HEAD_DIR
    if not (d / HEAD_CONFIG).exists():
        return None
    cfg = json.loads((d / HEAD_CONFIG).read_text())
    head = ConceptHead(cfg["width"], tuple(cfg["concepts"]), cfg["hidden"], cfg.get("context", 0))
    head.load_state_dict(load_file(str(d / HEAD_FILE)))
    return head.eval(), cfg
