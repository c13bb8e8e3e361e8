"""Presence scores of the erased concept on benign inverted renders (the gate bench's benign requests)."""
import sys, numpy as np, torch
from irece_runtime.loading import load_pipeline
from irece_runtime.irece import IreceConfig
from benchmarks import crr, batch as gen
from benchmarks.presence import trajectory
from miniworld import shapes
model = "miniworld/models/shapes10"; s = crr.BenchSettings(n=16, t_star=0.5)
pipe = load_pipeline(model, crr.erased_unet(model, sys.argv[1], "star", s))
cfg = IreceConfig(concepts=("star",), gate="classifier", t_star=0.5)
uncond = pipe.encode_prompt(""); step = cfg.step_index(25); k = pipe.contrast_set(cfg).index("star")
for o in ("circle", "square", "triangle", "heart", "cross", "diamond", "ring", "moon", "arrow"):
    refs = np.stack([shapes.render(o, seed=s.seed + 77 + j).image for j in range(s.n)])
    for who in ("erased", "standard"):
        x_T = gen.invert_images(pipe, refs, who, 25)
        ((_, t, x_t),) = trajectory(pipe, x_T, uncond, uncond, 5.0, 25, (step,), model="erased")
        sc = pipe.presence(x_t, t, cfg)
        top = [pipe.contrast_set(cfg)[i] for i in sc.argmax(1)]
        print(o, who, "star score max %.2f, >=0.305: %d/16" % (sc[:, k].max(), (sc[:, k] >= 0.305).sum()),
              "own top:", sum(tp == o for tp in top), flush=True)
