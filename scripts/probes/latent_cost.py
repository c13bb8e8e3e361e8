"""Probe: what a 16x16-latent world would cost here. The committed model (f=4 VAE, UNet 64/128) runs unchanged on
64x64 images (a 16x16 latent), so one generation at 32 px against one at 64 px, interleaved, is the cost ratio of
a finer world of the same widths (what the test suite and every benchmark pay per image).

python scripts/probes/latent_cost.py [repeats]
"""
import sys
import time

import numpy as np
import torch

from irece_runtime.irece import IreceConfig
from irece_runtime.loading import load_pipeline

REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
pipe = load_pipeline("miniworld/models/shapes10")
unet = pipe.backend.unets["standard"]
hidden = pipe.encode_prompt("a red star on a white background")
uncond = pipe.encode_prompt("")
cfg = IreceConfig(concepts=("star",), t_star=0.5)
rows = {}
for side in (8, 16) * REPEATS:
    x = torch.randn(8, 4, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(10):
            unet(torch.cat([x, x]), torch.tensor(500), torch.cat([hidden.expand(8, -1, -1), uncond.expand(8, -1, -1)]))
        t_unet = (time.perf_counter() - t0) / 10
        t0 = time.perf_counter()
        pipe.denoise(x, hidden, uncond, 5.0, 25, cfg, 0)
        t_gen = time.perf_counter() - t0
    rows.setdefault(side, []).append((t_unet, t_gen))
med = {s: np.median(np.array(v), 0) for s, v in rows.items()}
print(f"threads {torch.get_num_threads()}; medians of {REPEATS} interleaved runs, batch 8 (16 UNet rows a call)")
print(f"16x16 / 8x8: one UNet call {med[16][0] / med[8][0]:.2f}x, 25-step generation with IRECE "
      f"{med[16][1] / med[8][1]:.2f}x")
