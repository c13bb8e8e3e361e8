"""Per-scene view of split_masks on two-shape scenes (pair prompts on): what the gate saw, the target's mask area
before and after the split, and whether the target went and the other stayed; DILATE=1 grows the target's mask by a
3x3 max-pool before the split; OTHERS_AT=0.5: other concepts count as shown from half the threshold;
TAU=0.3: the mask's tau; RECHECK=1: IRECE runs again at irece.RECHECK (the full defence's later looks);
SPLIT=0, PAIRS=0: without split_masks, without pair prompts. Usage: split_detail.py N_PAIRS THRESHOLD"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import batch as gen
from benchmarks.crr import BenchSettings
from benchmarks.gate import PAIR_SEED
from irece_runtime import irece
from irece_runtime.irece import IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld import shapes
from miniworld.assets import MODEL_DIR
from miniworld.judge import load_judge, shows

n, thr = int(sys.argv[1]), float(sys.argv[2])
dilate = os.environ.get("DILATE") == "1"
s = BenchSettings(t_star=0.5)
pipe, judge = load_pipeline(str(MODEL_DIR)), load_judge()
seen = {}
split = irece.split_among_shown


def traced(maps, masks, shown):
    if dilate:
        masks = F.max_pool2d(masks, 3, stride=1, padding=1)
    out = split(maps, masks, shown)
    seen.update(before=float(masks[0].mean()), after=float(out[0].mean()), n_shown=int(shown[:, 0].sum()))
    return out


irece.split_among_shown = traced
if os.environ.get("OTHERS_AT"):  # other concepts count as shown from OTHERS_AT x the threshold (targets unchanged)
    factor = 1.0 / float(os.environ["OTHERS_AT"])
    real_presence = pipe.presence_steps

    def presence_steps(x, t, cfg, cond=None):
        scores, carried = yield from real_presence(x, t, cfg, cond)
        concepts = pipe.contrast_set(cfg)
        boost = torch.tensor([1.0 if c in cfg.concepts else factor for c in concepts])
        return scores * boost, carried
    pipe.presence_steps = presence_steps
rng = np.random.default_rng(PAIR_SEED + s.seed)
scenes = [shapes.render_scene(2, rng=rng) for _ in range(n)]
x_T = gen.invert_images(pipe, np.stack([sc.image for sc in scenes]), "standard", s.steps)
tally = []
for k, sc in enumerate(scenes):
    target, other = sc.shapes[0].concept, sc.shapes[1].concept
    seen.clear()
    cfg = IreceConfig(concepts=(target,), tau=float(os.environ.get("TAU", s.tau)), t_star=s.t_star,
                      gate="classifier", threshold=thr, classifier_pairs=os.environ.get("PAIRS", "1") == "1",
                      split_masks=os.environ.get("SPLIT", "1") == "1",
                      recheck=irece.RECHECK if os.environ.get("RECHECK") == "1" else ())
    on, masks = gen.from_latents(pipe, x_T[k:k + 1], "", cfg, seed=s.seed, steps=s.steps, guidance=s.guidance)
    r, o = bool(~shows(judge, on, target)[0]), bool(shows(judge, on, other)[0])
    row = {"target": target, "other": other, "mask": float(masks.mean()) if masks is not None else 0.0,
           "removed": r, "kept": o, **seen}
    tally.append(row)
    print(json.dumps(row), flush=True)
t = {k: float(np.mean([r[k] for r in tally])) for k in ("removed", "kept")}
print("removed", t["removed"], "kept", t["kept"], "both", np.mean([r["removed"] and r["kept"] for r in tally]))
