"""Probe: which training choices make the concept head (miniworld/head.py) a better gate and mask.

Collects (or reads from .cache/head) the head's training features on the committed model, and features of a
validation split (320 other scenes from seed 6,500,000: inside the head's own seed range, used by no benchmark or
test), then fits variants and scores each on the validation split at every schedule point:
presence AUC (inverted renders: the scene's shapes; text prompts: the caption's), TPR at 3% FP, single-shape IoU
at cuts 0.2-0.5, and on two/three-shape renders the share of the own / the largest other shape the mask covers.

python scripts/probes/head_variants.py [n_train] [variants, e.g. base,long,t05,wide,binary,t05ctx,t05ctx2,
                                                 dir=PATH]
(t05ctx: fitted at t = 0.5 with one 3x3 layer, head v3 and v4; t05ctx2: two; dir=PATH: no fit, the head saved in
the model folder PATH, e.g. the committed one, or an older one from `git show`.) Besides the whole inverted split,
presence AUC is given on its perturbed renders (noise, blur, JPEG) and on its scenes of two or three shapes.
"""
import sys
import time

import numpy as np
import torch

from benchmarks.localization import iou, pixel_mask
from benchmarks.presence import auc, constrained_threshold
from irece_runtime.concept_head import FEATURE_BLOCKS, UNetFeatures, load_head
from irece_runtime.loading import load_pipeline
from miniworld import head as H
from miniworld.assets import MODEL_DIR

torch.set_num_threads(2)
N_TRAIN = int(sys.argv[1]) if len(sys.argv) > 1 else H.N_SCENES
VARIANTS = (sys.argv[2] if len(sys.argv) > 2 else "base,long,t05,wide,binary").split(",")
VAL_SEED, N_VAL = 6_500_000, 320
pipe = load_pipeline(MODEL_DIR)
concepts = tuple(pipe.vocabulary)
feats = UNetFeatures(pipe.backend.unets["standard"], FEATURE_BLOCKS)


t0 = time.time()
tr, va = (H.scene_features(pipe, MODEL_DIR, n, seed, feats, concepts, cache=".cache/head")
          for n, seed in ((N_TRAIN, H.HEAD_SEED), (N_VAL, VAL_SEED)))
val_scenes = H.scenes(N_VAL, VAL_SEED)
print(f"features: train {tuple(tr['x'].shape)}, validation {tuple(va['x'].shape)} in {time.time() - t0:.0f}s",
      flush=True)


def variant(name):
    """(rows to fit on, target transform, epochs, hidden, context layers)"""
    every = torch.ones(len(tr["x"]), dtype=torch.bool)
    at05 = tr["t_point"] == H.T_POINTS.index(0.5)
    return {"base": (every, None, 80, 64, 0), "long": (every, None, 300, 64, 0), "t05": (at05, None, 300, 64, 0),
            "wide": (every, None, 300, 128, 0), "binary": (every, "binary", 300, 64, 0),
            "t05binary": (at05, "binary", 300, 64, 0), "t05ctx": (at05, None, 300, 64, 1),
            "t05ctx2": (at05, None, 300, 64, 2)}[name]


def evaluate(name, head):
    for k, tp in enumerate(H.T_POINTS):
        rows = va["t_point"] == k
        with torch.no_grad():
            p = head(va["x"][rows])
        spatial = va["spatial"][rows]
        present = (va["y"][rows].flatten(2).amax(2) > 0).numpy()
        score = p.flatten(2).amax(2).numpy()
        line = f"{name:9s} t={tp} "
        for src, m in (("inverted", spatial.numpy()), ("text", ~spatial.numpy())):
            y, s = present[m].ravel(), score[m].ravel()
            thr = constrained_threshold(y, s, 0.03)
            line += f"{src} AUC {auc(y, s):.3f} TPR {(s[y] >= thr).mean():.2f} | "
        inv = p[spatial]  # the validation scenes in order (inverted rows come first in each chunk)
        y, sc_ = present[spatial.numpy()], score[spatial.numpy()]
        for part, keep in (("perturbed", [sc.perturbation is not None for sc in val_scenes]),
                           ("2-3 shapes", [len(sc.shapes) >= 2 for sc in val_scenes])):
            keep = np.array(keep)
            line += f"{part} AUC {auc(y[keep].ravel(), sc_[keep].ravel()):.3f} | "
        for cut in (0.2, 0.3, 0.4, 0.5):
            ious, own, other = [], [], []
            for i, sc in enumerate(val_scenes):
                for c, m in sc.masks.items():
                    pm = pixel_mask((inv[i, concepts.index(c)] >= cut).numpy())
                    if len(sc.shapes) == 1:
                        ious.append(iou(pm, m))
                    else:
                        own.append((pm & m).sum() / m.sum())
                        other.append(max((pm & mm).sum() / mm.sum() for cc, mm in sc.masks.items() if cc != c))
            line += f"cut {cut}: IoU {np.mean(ious):.3f} own {np.mean(own):.2f} other {np.mean(other):.2f}; "
        print(line, flush=True)


for name in VARIANTS:
    if name.startswith("dir="):
        head, cfg = load_head(name[4:])
        print(f"{name}: {cfg}", flush=True)
        evaluate(name[4:].rstrip("/").split("/")[-1][:9], head)
        continue
    rows, target, epochs, hidden, context = variant(name)
    Y = tr["y"][rows]
    if target == "binary":  # every cell a shape touches counts as the shape's (bigger masks, coarser edges)
        Y = (Y > 0).float()
    t1 = time.time()
    head = H.fit(tr["x"][rows], Y, tr["spatial"][rows], concepts, hidden, epochs, context=context)
    print(f"{name}: {int(rows.sum())} rows, {epochs} epochs, hidden {hidden}, context {context}, fit {time.time() - t1:.0f}s", flush=True)
    evaluate(name, head)
