"""Quality gates of the mini world: judge accuracy on held-out renders, and text-prompt accuracy of the model."""
from __future__ import annotations

import numpy as np

from miniworld import shapes
from miniworld.judge import LABELS, classify, load_judge
from miniworld.prompts import concept_prompts

HELD_OUT_SEED = 9_000_000  # renders from this seed on were never used in training (training uses seeds 0..3)


def held_out_renders(n: int, seed: int = HELD_OUT_SEED):
    rng = np.random.default_rng(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    return np.stack([shapes.render(lab, rng=rng).image for lab in labels]), labels


def judge_accuracy(judge, n: int = 2000) -> float:
    images, labels = held_out_renders(n)
    pred, _ = classify(judge, images)
    return float(np.mean([p == t for p, t in zip(pred, labels)]))


def text_accuracy(pipe, judge, concepts=shapes.CONCEPTS, n: int = 50, steps: int = 25, guidance: float = 5.0,
                  seed: int = 0, cfg=None) -> dict[str, float]:
    from .batch import from_prompts

    acc = {}
    for i, concept in enumerate(concepts):
        images, _ = from_prompts(pipe, concept_prompts(concept, n, seed + i),
                                 [seed + 1000 * i + k for k in range(n)], cfg, steps=steps, guidance=guidance)
        pred, _ = classify(judge, images)
        acc[concept] = float(np.mean([p == concept for p in pred]))
    return acc


def check(pipe, judge_path=None, n: int = 50, n_judge: int = 2000) -> dict:
    judge = load_judge(judge_path) if judge_path else load_judge()
    return {"judge_accuracy": judge_accuracy(judge, n_judge), "text_accuracy": text_accuracy(pipe, judge, n=n)}
