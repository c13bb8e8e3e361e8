"""Probe 2: the paper's per-concept attention maps at x_t (from collect.py's npz) for every concept."""
import sys
import numpy as np
import torch
from irece_runtime.loading import load_pipeline

pipe = load_pipeline(sys.argv[1])
d = np.load(sys.argv[2])
steps = 25
t = pipe.scheduler(steps).timesteps[12]
concepts = list(d["concepts"])
xt = torch.tensor(d["xt"])
maps = []
with torch.no_grad():
    for tmpl in ("a photo of a {concept}", "a {concept}"):
        per = []
        for c in concepts:
            h, w = pipe.localization(c, tmpl)
            per.append(pipe.backend.concept_map(xt, t, h.expand(len(xt), -1, -1), w.expand(len(xt), -1)))
        maps.append(torch.stack(per, 1).numpy())
    cm = pipe.concept_maps(xt, t, tuple(concepts)).numpy()
np.savez_compressed(sys.argv[3], paper=maps[0], short=maps[1], contrastive=cm)
