"""Does split_masks cost anything on single-shape images? White-box inversions of star renders (null prompt), IRECE
aimed at star behind the classifier gate, with and without split_masks (and the rechecks), every erasure method:
CRR of star. Usage: split_single.py THRESHOLD"""
import json
import sys
from dataclasses import replace

from benchmarks import batch as gen
from benchmarks.crr import BenchSettings, erased_unet, inverted
from irece_runtime.irece import RECHECK, IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld.assets import MODEL_DIR
from miniworld.judge import load_judge, shows

thr = float(sys.argv[1])
s = BenchSettings(t_star=0.5)
judge, model = load_judge(), str(MODEL_DIR)
base = IreceConfig(concepts=("star",), tau=s.tau, t_star=s.t_star, gate="classifier", threshold=thr)
for method in ("uce", "esd-x", "esd-u", "receler"):
    erased = erased_unet(model, method, "star", s)
    pipe = load_pipeline(model, erased)
    x_T = inverted(pipe, model, erased, "star", "erased", False, s)
    row = {"method": method}
    for name, cfg in (("gated", base), ("split", replace(base, split_masks=True)),
                      ("recheck", replace(base, recheck=RECHECK)),
                      ("split+recheck", replace(base, split_masks=True, recheck=RECHECK))):
        imgs, _ = gen.from_latents(pipe, x_T, "", cfg, seed=s.seed, steps=s.steps, guidance=s.guidance)
        row[name] = float(shows(judge, imgs, "star").mean())
    print(json.dumps(row), flush=True)
