import sys, json, numpy as np, torch, torch.nn.functional as F
from dataclasses import replace
from irece_runtime import irece
from irece_runtime.irece import IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld.judge import load_judge
from benchmarks import gate as G
from benchmarks.crr import BenchSettings
model = "miniworld/models/shapes10"
judge = load_judge()
orig = irece.concept_mask
def dilated(m, tau, min_peak=0.0):
    out = orig(m, tau, min_peak)
    return F.max_pool2d(out[:, None], 3, 1, 1)[:, 0]
cache = {}
def pipe_for(e):
    if e not in cache: cache[e] = load_pipeline(model, e)
    return cache[e]
G.GATES = ("classifier",)
methods = sys.argv[1].split(",")
for name, tau, dil in (("tau0.4", 0.4, False), ("tau0.3", 0.3, False), ("tau0.4+dilate", 0.4, True), ("tau0.2", 0.2, False)):
    irece.concept_mask = dilated if dil else orig
    s = BenchSettings(n=16, t_star=0.5, tau=tau)
    cfg = IreceConfig(tau=tau, t_star=0.5, threshold=0.305)
    wc = [r for r in G.wrong_concept(pipe_for, judge, model, "star", "moon", methods, s, cfg) if r["aimed_at"] == "star"]
    pr = G.pairs(pipe_for(None), judge, 20, s, cfg)[0]
    print(name, {r["method"]: r["crr"] for r in wc}, {k: round(v, 2) for k, v in pr.items() if k != "gate"}, flush=True)
