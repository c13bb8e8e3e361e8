"""The judge: an 11-way classifier (10 shapes + "none") that decides CRR in every benchmark.

Trained on renders with noise, blur, colour jitter and VAE round trips (`irece world train`), so it
also reads generated images. Weights: models/judge/judge.safetensors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from safetensors.torch import load_file

from .assets import JUDGE_PATH
from .shapes import CONCEPTS, NO_SHAPE

LABELS = CONCEPTS + (NO_SHAPE,)
DEFAULT_PATH = JUDGE_PATH


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.features = nn.Sequential(block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float images in [-1, 1], (B, 3, 32, 32) -> logits (B, 11)."""
        return self.head(self.features(x))


def load_judge(path: str | Path = DEFAULT_PATH) -> Judge:
    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()


@torch.no_grad()
def classify(judge: Judge, images: np.ndarray | torch.Tensor, batch: int = 256) -> tuple[list[str], np.ndarray]:
    """images: uint8 (B, H, W, 3) or float (B, 3, H, W) in [-1, 1]. Returns (labels, p of the label)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0
    if images.shape[-1] != 32:
        images = torch.nn.functional.interpolate(images, size=(32, 32), mode="area")
    probs = torch.cat([judge(images[i:i + batch]).softmax(-1) for i in range(0, len(images), batch)])
    p, idx = probs.max(-1)
    return [LABELS[i] for i in idx.tolist()], p.numpy()
