"""Sixteenth session: does keep_others (keep_outside's composite also keeps, inside the mask, the pixels where the
head's first look saw another concept beat the target) ever keep the target itself? Single-shape renders of each of
the ten concepts, white-box inverted on METHOD erasing it (crr.inversion: the bench gate control's renders, with
their trajectory), null prompt, head gate aimed at the concept (right aim) and at a wrong one, recheck, keep_outside,
negative guidance G: how many images show the concept, with and without keep_others (OTHERTAU=F: another floor for
the other concept's probability than irece.KEEP_OTHERS_FLOOR).

    PYTHONPATH=. python scripts/probes/keep_others_single.py N METHOD G     # 16 uce 3: about 6 min
"""
import os
import sys
from dataclasses import replace

import numpy as np

from benchmarks import batch as gen
from benchmarks.crr import BenchSettings, erased_unet, inversion
from irece_runtime.irece import RECHECK, IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld import shapes
from miniworld.judge import load_judge, shows

MODEL = "miniworld/models/shapes10"
if os.environ.get("OTHERTAU"):  # the product's floor for the others' probability (irece.KEEP_OTHERS_FLOOR)
    from irece_runtime import irece
    irece.keep_pixels_outside.__defaults__ = (None, float(os.environ["OTHERTAU"]))
n, method, g = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
s = BenchSettings(n=n, t_star=0.5)
judge = load_judge()
base = IreceConfig(gate="head", t_star=0.5, threshold=0.217, tau=0.2, grow=1, recheck=RECHECK, keep_outside=True,
                   negative_guidance=g)
totals = {}
for concept in shapes.CONCEPTS:
    erased = erased_unet(MODEL, method, concept, s)
    pipe = load_pipeline(MODEL, erased)
    x_T, trajectory = inversion(pipe, MODEL, erased, concept, "erased", False, s)
    wrong = "moon" if concept != "moon" else "star"
    row = []
    for aim in (concept, wrong):
        for others in (False, True):
            c = replace(base, concepts=(aim,), keep_others=others)
            imgs, _ = gen.from_latents(pipe, x_T, "", c, seed=s.seed, steps=s.steps, guidance=s.guidance,
                                       trajectory=trajectory)
            hit = int(shows(judge, imgs, concept).sum())
            key = ("right" if aim == concept else "wrong", others)
            totals[key] = totals.get(key, 0) + hit
            row.append(f"{key[0]}{'+others' if others else ''} {hit}/{n}")
    print(f"{concept:8s} " + "  ".join(row), flush=True)
m = n * len(shapes.CONCEPTS)
for k, v in totals.items():
    print(f"{k[0]:5s} keep_others={k[1]!s:5s} shows the concept {v}/{m} = {v / m:.3f}")
