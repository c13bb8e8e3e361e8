"""The judge: a multi-label classifier (which of the 10 shapes a picture shows) that decides CRR everywhere.

Trained on renders of none to three shapes with noise, blur, colour jitter and VAE round trips (`irece world
train`), so it also reads generated images. Weights: miniworld/models/judge/judge.safetensors. A judge saved
with 11 outputs is the first world's single-label one (10 shapes + "none", softmax); it still loads, and its
softmax probabilities stand in for presence.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from irece_runtime.images import to_tensor

from .assets import JUDGE_PATH
from .shapes import CONCEPTS, NO_SHAPE

DEFAULT_PATH = JUDGE_PATH
LABELS = CONCEPTS + (NO_SHAPE,)  # classify's answers


class Judge(nn.Module):
    def __init__(self, width: int = 32, outputs: int = len(CONCEPTS)):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.features = nn.Sequential(block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, outputs)
        self.single_label = outputs == len(CONCEPTS) + 1  # the first world's judge: softmax over shapes + none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float images in [-1, 1], (B, 3, 32, 32) -> per-concept logits (B, 10); sigmoid = presence."""
        return self.head(self.features(x))


def load_judge(path: str | Path = DEFAULT_PATH) -> Judge:
    state = load_file(str(path))
    judge = Judge(outputs=state["head.weight"].shape[0])
    judge.load_state_dict(state)
    return judge.eval()


@torch.no_grad()
def _probabilities(judge: Judge, images: np.ndarray | torch.Tensor, batch: int) -> np.ndarray:
    x = to_tensor(images) if isinstance(images, np.ndarray) else images
    if x.shape[-1] != 32:
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="area")
    logits = torch.cat([judge(x[i:i + batch]) for i in range(0, len(x), batch)])
    return (logits.softmax(-1) if judge.single_label else logits.sigmoid()).numpy()


def presence(judge: Judge, images: np.ndarray | torch.Tensor, batch: int = 256) -> np.ndarray:
    """images: uint8 (B, H, W, 3) or float (B, 3, H, W) in [-1, 1] -> P(concept shown), (B, 10) in CONCEPTS order."""
    return _probabilities(judge, images, batch)[:, :len(CONCEPTS)]


def shows(judge: Judge, images, concept: str) -> np.ndarray:
    """(B,) bool: the judge sees `concept` in each image (whatever else it shows). This is what CRR counts."""
    return presence(judge, images)[:, CONCEPTS.index(concept)] >= 0.5


def classify(judge: Judge, images: np.ndarray | torch.Tensor, batch: int = 256) -> tuple[list[str], np.ndarray]:
    """The most likely shape per image, or "none" when no shape reaches p = 0.5: (labels, p of the label)."""
    if judge.single_label:  # the first world's judge: argmax over shapes and "none"
        p = _probabilities(judge, images, batch)
        return [LABELS[k] for k in p.argmax(1)], p.max(1)
    p = presence(judge, images, batch)
    top = p.argmax(1)
    peak = p.max(1)
    labels = [CONCEPTS[k] if peak[i] >= 0.5 else NO_SHAPE for i, k in enumerate(top)]
    return labels, np.where(peak >= 0.5, peak, 1 - peak)
