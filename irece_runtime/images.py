"""The one image <-> tensor pair: uint8 pictures on the outside, [-1, 1] NCHW tensors at the VAE."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageFilter


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


PERTURBATIONS = ("noise", "blur", "jpeg")


# what a photo goes through on its way to the service: sensor noise, blur, lossy compression
def perturb(image: np.ndarray, kind: str, sigma: float = 12.0, radius: float = 0.8, quality: int = 40,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """`image` (uint8 HxWx3) with Gaussian noise of std `sigma` (needs `rng`), a Gaussian blur of `radius` pixels,
    or a JPEG round trip at `quality`. The defaults are the CRR benchmark's black-box references."""
    if kind == "noise":
        if rng is None:
            raise ValueError("noise needs an rng")
        return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)
    if kind == "blur":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    raise ValueError(f"unknown perturbation {kind!r} (one of {PERTURBATIONS})")
