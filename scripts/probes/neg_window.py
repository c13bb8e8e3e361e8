"""Fifteenth session: negative guidance (G = 3) for only K steps after each re-noising (negative_guidance_steps),
wrong-concept control on N white-box inverted star renders (bench gate's own renders and seeds), head v4 settings.
Prints one JSON line per K: bench gate's wrong_concept rows.

    PYTHONPATH=. python scripts/probes/neg_window.py N METHOD[,METHOD] K[,K]     # 64 uce,esd-x 0,3,6: 4 min
"""
import json
import sys

from benchmarks import gate
from benchmarks.crr import BenchSettings
from irece_runtime.irece import IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld.judge import load_judge

MODEL = "miniworld/models/shapes10"
n, methods, ks = int(sys.argv[1]), sys.argv[2].split(","), [int(k) for k in sys.argv[3].split(",")]
judge = load_judge()
s = BenchSettings(n=n, t_star=0.5, tau=0.2)
cache = {}


def pipe_for(erased):
    if erased not in cache:
        cache[erased] = load_pipeline(MODEL, erased)
    return cache[erased]


for k in ks:
    cfg = IreceConfig(tau=0.2, t_star=0.5, threshold=0.217, gate="head", grow=1, negative_guidance=3.0,
                      negative_guidance_steps=k)
    print("K", k, json.dumps(gate.wrong_concept(pipe_for, judge, MODEL, "star", "moon", methods, s, cfg)), flush=True)
