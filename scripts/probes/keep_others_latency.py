"""Sixteenth session: the cost of keep_others on top of keep_outside: one inverted two-shape request (head + recheck +
keep_outside, G = 3), 24 interleaved runs of each, torch, ratio of medians.

    PYTHONPATH=. python scripts/probes/keep_others_latency.py     # 1 min
"""
import statistics
import time
from dataclasses import replace

import numpy as np

from irece_runtime.irece import IreceConfig, RECHECK
from irece_runtime.loading import load_pipeline
from irece_runtime.pipeline import Request
from miniworld import shapes
pipe = load_pipeline("miniworld/models/shapes10", None)
rng = np.random.default_rng(5)
sc = shapes.render_scene(2, rng=rng)
req = Request(init_image=sc.image, steps=25, seed=1, invert_with="standard")
c = IreceConfig(concepts=(sc.shapes[0].concept,), gate="head", t_star=0.5, threshold=0.217, tau=0.2, grow=1,
                recheck=RECHECK, keep_outside=True, negative_guidance=3.0)
ts = {False: [], True: []}
for i in range(24):
    for ko in (False, True) if i % 2 else (True, False):
        t0 = time.perf_counter()
        r = pipe.generate(req, replace(c, keep_others=ko))
        ts[ko].append(time.perf_counter() - t0)
print("intervened", r.irece.intervened, {k: statistics.median(v) for k, v in ts.items()},
      "ratio p50", statistics.median(ts[True]) / statistics.median(ts[False]))
