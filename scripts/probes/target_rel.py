"""Probe (#11 latency): could a cheap first look (the target's and the null prompt's rows only) rule a target out
before the classifier gate's K + 1 rows per t'? For scenes of the presence bench (text and inverted, both splits),
each concept's relative error rel = err(concept prompt) / err(null) per t', against the full gate's decision.
usage: PYTHONPATH=. python scripts/probes/target_rel.py [n_scenes] [t_star] [threshold]"""
import json
import sys

import numpy as np
import torch

import irece_runtime.irece as ir
from benchmarks import presence
from irece_runtime.irece import IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld.assets import MODEL_DIR

n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
t_star = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
threshold = float(sys.argv[3]) if len(sys.argv) > 3 else 0.305
pipe = load_pipeline(str(MODEL_DIR))
cfg = IreceConfig(gate="classifier", t_star=t_star)
concepts = pipe.contrast_set(cfg)
captured = []
real = ir.classifier_scores


def spy(errors, *a, **k):
    captured.append(errors.detach().clone())
    return real(errors, *a, **k)


ir.classifier_scores = spy
out = {}
for name, seed in (("calibration", presence.CALIBRATION_SEED), ("held_out", presence.HELD_OUT_SEED)):
    items = presence.scenes(n, seed)
    rows = []
    for source in ("text", "inverted"):
        captured.clear()
        presence.score_scenes(pipe, items, source, cfg, 25, 5.0, seed)
        errors = torch.cat(captured)  # (N, T', K + 1)
        rel = errors[..., :-1] / errors[..., -1:]
        score = real(errors)
        for k, sc in enumerate(items):
            shown = {s.concept for s in sc.shapes}
            for j, c in enumerate(concepts):
                rows.append({"present": c in shown, "score": float(score[k, j]), "rel": rel[k, :, j].tolist()})
    out[name] = rows
for name, rows in out.items():
    fire = [r for r in rows if r["score"] >= threshold]
    quiet = [r for r in rows if r["score"] < threshold]
    for stat, f in (("min rel over t'", lambda r: min(r["rel"])), ("rel at t'[0]", lambda r: r["rel"][0]),
                    ("rel at t'[1]", lambda r: r["rel"][1])):
        bar = max(f(r) for r in fire)
        skip = np.mean([f(r) > bar for r in quiet])
        print(f"{name}: {stat}: highest among {len(fire)} firing rows {bar:.4f}; quiet rows above it {skip:.1%} "
              f"(present among quiet {sum(r['present'] for r in quiet)}); firing quantiles "
              f"{np.quantile([f(r) for r in fire], [0.5, 0.9, 0.99]).round(4).tolist()}, quiet quantiles "
              f"{np.quantile([f(r) for r in quiet], [0.01, 0.1, 0.5]).round(4).tolist()}")
json.dump(out, open("/tmp/target_rel.json", "w"))
