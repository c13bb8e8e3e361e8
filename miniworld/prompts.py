"""Shapes-10's prompt generators: what the benchmarks, the demo and erasure on the mini world say to the model."""
from __future__ import annotations

import numpy as np

from .shapes import BACKGROUNDS, COLOURS, legible

ERASE_TEMPLATES = ("{concept}", "a {concept}", "an image of a {concept}", "a photo of a {concept}",
                   "a {colour} {concept}", "a {concept} on a {background} background",
                   "a {colour} {concept} on a {background} background")


def erase_prompts(concept: str, n: int = 24, seed: int = 0) -> list[str]:
    """Varied prompts that name the concept, with the world's colours and backgrounds (erasure.PromptSet)."""
    rng = np.random.default_rng(seed)
    out = [t.format(concept=concept) for t in ERASE_TEMPLATES[:4]]
    while len(out) < n:
        c, b = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        if legible(c, b):
            out.append(ERASE_TEMPLATES[4 + len(out) % 3].format(concept=concept, colour=c, background=b))
    return out


def concept_prompts(concept: str, n: int, seed: int) -> list[str]:
    """'a {colour} {concept} on a {background} background' with legible random colour/background pairs."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        c = list(COLOURS)[rng.integers(len(COLOURS))]
        b = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        if legible(c, b):
            out.append(f"a {c} {concept} on a {b} background")
    return out
