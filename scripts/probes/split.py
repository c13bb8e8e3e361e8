"""Two-shape scenes under the classifier gate, with and without split_masks (and pair prompts): target removed,
other kept, PSNR outside the mask. Usage: split.py N_PAIRS THRESHOLD_SINGLES THRESHOLD_PAIRS"""
import json
import sys
from dataclasses import replace

from benchmarks import gate
from benchmarks.crr import BenchSettings
from irece_runtime.irece import IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld.assets import MODEL_DIR
from miniworld.judge import load_judge

n, thr_single, thr_pairs = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
s = BenchSettings(t_star=0.5)
pipe, judge = load_pipeline(str(MODEL_DIR)), load_judge()
gate.GATES = ("classifier",)  # the paper's row is in results/gate_v4.json
base = IreceConfig(tau=s.tau, t_star=s.t_star, gate="classifier")
out = []
for pairs_ in (False, True):
    for split in (False, True):
        cfg = replace(base, threshold=thr_pairs if pairs_ else thr_single, classifier_pairs=pairs_, split_masks=split)
        row = gate.pairs(pipe, judge, n, s, cfg)[0] | {"classifier_pairs": pairs_, "split_masks": split}
        print(json.dumps(row), flush=True)
        out.append(row)
