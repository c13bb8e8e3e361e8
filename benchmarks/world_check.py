"""Quality gates of the mini world: judge accuracy on held-out renders (one shape, and scenes of two or three:
the exact set of shapes), text-prompt accuracy per concept, and two-shape prompts (both named shapes drawn)."""
from __future__ import annotations

import numpy as np

from miniworld import shapes
from miniworld.judge import LABELS, classify, load_judge, presence
from miniworld.prompts import concept_prompts

HELD_OUT_SEED = 9_000_000  # renders from this seed on were never used in training (training uses seeds 0..3)
SCENE_SEED = 9_100_000
FLOORS = {"judge_accuracy": 0.98, "judge_scene_accuracy": 0.98, "text_accuracy": 0.90, "pair_both_present": 0.80}


def held_out_renders(n: int, seed: int = HELD_OUT_SEED):
    rng = np.random.default_rng(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    return np.stack([shapes.render(lab, rng=rng).image for lab in labels]), labels


def judge_accuracy(judge, n: int = 2000) -> float:
    """One shape or none per render: the judge's top label."""
    images, labels = held_out_renders(n)
    pred, _ = classify(judge, images)
    return float(np.mean([p == t for p, t in zip(pred, labels)]))


def judge_scene_accuracy(judge, n: int = 1000, seed: int = SCENE_SEED) -> float:
    """Scenes of two or three shapes: the judge's present set (p >= 0.5) equals the drawn set."""
    rng = np.random.default_rng(seed)
    scenes = [shapes.render_scene(2 + (i % 2), rng=rng) for i in range(n)]
    p = presence(judge, np.stack([s.image for s in scenes])) >= 0.5
    truth = np.array([[c in {sh.concept for sh in s.shapes} for c in shapes.CONCEPTS] for s in scenes])
    return float((p == truth).all(1).mean())


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


def pair_accuracy(pipe, judge, n: int = 100, steps: int = 25, guidance: float = 5.0,
                  seed: int = SCENE_SEED) -> dict:
    """Prompts naming two shapes ("a red star and a blue heart on a white background", both word orders, with and
    without colours): share of images in which the judge sees both named shapes."""
    from .batch import from_prompts

    rng = np.random.default_rng(seed + 1)
    scenes = [shapes.render_scene(2, rng=rng) for _ in range(n)]
    prompts = [s.prompt(order=[k % 2, 1 - k % 2], colours=k % 4 < 2) for k, s in enumerate(scenes)]
    images, _ = from_prompts(pipe, prompts, [seed + k for k in range(n)], None, steps=steps, guidance=guidance)
    p = presence(judge, images) >= 0.5
    idx = [[shapes.CONCEPTS.index(sh.concept) for sh in s.shapes] for s in scenes]
    both = [bool(p[k, i].all()) for k, i in enumerate(idx)]
    return {"n": n, "both_present": float(np.mean(both)),
            "any_present": float(np.mean([bool(p[k, i].any()) for k, i in enumerate(idx)]))}


def check(pipe, judge_path=None, n: int = 50, n_judge: int = 2000, n_pairs: int = 100) -> dict:
    judge = load_judge(judge_path) if judge_path else load_judge()
    out = {"judge_accuracy": judge_accuracy(judge, n_judge),
           "judge_scene_accuracy": judge_scene_accuracy(judge, n_judge // 2),
           "text_accuracy": text_accuracy(pipe, judge, n=n),
           "pairs": pair_accuracy(pipe, judge, n_pairs)}
    low = [c for c, a in out["text_accuracy"].items() if a < FLOORS["text_accuracy"]]
    out["floors"] = FLOORS
    out["passed"] = bool(out["judge_accuracy"] >= FLOORS["judge_accuracy"]
                         and out["judge_scene_accuracy"] >= FLOORS["judge_scene_accuracy"]
                         and not low and out["pairs"]["both_present"] >= FLOORS["pair_both_present"])
    return out
