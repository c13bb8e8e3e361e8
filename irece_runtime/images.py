"""The one image <-> tensor pair: uint8 pictures on the outside, [-1, 1] NCHW tensors at the VAE."""
from __future__ import annotations

import numpy as np
import torch


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1] (the VAE's input range)."""
    a = np.ascontiguousarray(images, dtype=np.float32)
    a = a[None] if a.ndim == 3 else a
    return torch.from_numpy(a).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_unit(x: torch.Tensor) -> np.ndarray:
    """VAE output (N, 3, H, W) in about [-1, 1] -> float32 (N, H, W, 3) clamped to [0, 1]."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded (what a PNG stores)."""
    return (unit * 255).round().astype(np.uint8)
