"""CRR and its 95% Wilson score interval; image-change metrics."""
from __future__ import annotations

import math

import numpy as np


def crr(labels: list[str], concept: str) -> float:
    """Concept reproduction rate: share of images the judge labels as the concept."""
    return sum(lab == concept for lab in labels) / len(labels) if labels else float("nan")


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 images, optionally only where mask (H, W) is True."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if mask is not None:
        if not mask.any():
            return float("inf")
        d = d[mask]
    mse = d.mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM (7x7 uniform windows, per channel) of uint8 images, averaged where mask is True."""
    from scipy.ndimage import uniform_filter
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    maps = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        mx, my = uniform_filter(x, 7), uniform_filter(y, 7)
        vx = uniform_filter(x * x, 7) - mx * mx
        vy = uniform_filter(y * y, 7) - my * my
        cxy = uniform_filter(x * y, 7) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    m = np.mean(maps, axis=0)
    return float(m[mask].mean()) if mask is not None and mask.any() else float(m.mean())
