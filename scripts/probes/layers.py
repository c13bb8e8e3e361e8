import numpy as np, json
from benchmarks import localization as L
from irece_runtime.loading import load_pipeline
from irece_runtime.backends.torch_backend import require_torch
from miniworld import shapes
p = load_pipeline("miniworld/models/shapes10")
names = require_torch(p.backend, "x").localizer.layer_names
print(names)
rng = np.random.default_rng(L.LOC_SEED)
scenes = [shapes.render(shapes.CONCEPTS[i % 10], rng=rng) for i in range(40)]
images = np.stack([s.image for s in scenes])
res = {}
for name in ["all"] + [n.replace(".processor", "").replace(".attn2", "") for n in names]:
    pipe = load_pipeline("miniworld/models/shapes10", layers=None if name == "all" else (name,))
    for tau in (0.4, 0.5):
        m = L.masks_for(pipe, images, [s.label for s in scenes], tau, 0.3, 25)
        ious = [L.iou(L.pixel_mask(a), s.mask) for a, s in zip(m, scenes)]
        res[f"{name} tau{tau}"] = float(np.mean(ious)); print(name, tau, round(float(np.mean(ious)), 3), flush=True)
