"""Thirteenth session: two-shape scenes per scene, on a calibration split (not bench gate's scenes), for IRECE
settings given as NAME=key:value,... (IreceConfig fields beside the head gate at t* 0.5). Says per setting why a
scene fails: the gate did not open, the target came back, or the other shape was lost.

    python scripts/probes/pairs_sweep.py SEED N METHOD|standard base=tau:0.2,grow:1,keep_outside:1 ...
"""
import os
import sys
from dataclasses import replace

import numpy as np

from benchmarks import batch as gen
from benchmarks.crr import BenchSettings
from benchmarks.gate import PAIR_SEED
from irece_runtime.irece import RECHECK, IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld import shapes
from miniworld.judge import load_judge, shows

from common import continuation

SAVE = os.environ.get("SAVE")
DIAG = bool(os.environ.get("DIAG"))
MODEL = "miniworld/models/shapes10"
seed, n, cont = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = BenchSettings(seed=seed, t_star=0.5)
judge = load_judge()
std = load_pipeline(MODEL, None)
pipe_of = continuation(MODEL, cont, std)


def parse(spec):
    out = {}
    for kv in spec.split(","):
        k, v = kv.split(":")
        out[k] = (RECHECK if v == "1" else ()) if k == "recheck" else bool(int(v)) if k == "keep_outside" else \
            int(v) if k == "grow" else float(v)
    return out


rng = np.random.default_rng(PAIR_SEED + 1000 * seed)  # bench gate uses PAIR_SEED + seed with seed 0
scenes = [shapes.render_scene(2, rng=rng) for _ in range(n)]
traj = []
x_T = gen.invert_images(std, np.stack([sc.image for sc in scenes]), "standard", s.steps, trajectory=traj)
for arg in sys.argv[4:]:
    name, spec = arg.split("=", 1)
    cfg = None if spec == "none" else IreceConfig(**({"gate": "head", "t_star": 0.5, "threshold": 0.217} | parse(spec)))
    why = {"ok": 0, "closed": 0, "target": 0, "other": 0, "both": 0}
    scores = []
    for k, sc in enumerate(scenes):
        target, other = sc.shapes[0].concept, sc.shapes[1].concept
        p = pipe_of(target)
        part = [lv[k:k + 1] for lv in traj]
        x, rep = p.denoise(x_T[k:k + 1], p.encode_prompt(""), p.encode_prompt(""), s.guidance, s.steps,
                           cfg and replace(cfg, concepts=(target,)), s.seed, trajectory=part)
        img = gen.decode(p, x, rep, part if cfg is not None and cfg.keep_outside else None)
        r, o = bool(~shows(judge, img, target)[0]), bool(shows(judge, img, other)[0])
        score = rep.concepts[0].score if rep is not None else float("nan")
        scores.append(score)
        if SAVE:
            from PIL import Image
            Image.fromarray(img[0]).resize((128, 128), Image.NEAREST).save(f"{SAVE}/{name}_{k}.png")
        outcome = ("ok" if r and o else "closed" if cfg is not None and not (rep and rep.intervened) else
                   "both" if not (r or o) else "target" if not r else "other")
        if DIAG and rep is not None and rep.mask is not None:
            m = np.kron(rep.mask[0].cpu().numpy(), np.ones((shapes.SIZE // rep.mask.shape[-1],) * 2)) > 0
            cover = [float(m[sc.masks[c]].mean()) for c in (target, other)]
            sh = sc.shapes
            gap = float(np.hypot(sh[0].cx - sh[1].cx, sh[0].cy - sh[1].cy) - sh[0].r - sh[1].r)
            print(f"  {k:2d} {target:8s} {other:8s} {outcome:6s} score {score:.2f} cover target {cover[0]:.2f} "
                  f"other {cover[1]:.2f} mask {m.mean():.2f} gap {gap:.1f}px", flush=True)
        why[outcome] += 1
    print(f"{name:10s} {spec:45s} removed+kept {why['ok'] / n:.3f}  {why}  score median {np.median(scores):.3f}",
          flush=True)
