import sys
import numpy as np
import torch
from common import load, report as _report
d, err, lab, src, ns, rel = load(sys.argv[1]); pp = np.load(sys.argv[2])
N, T, K1, H, W = err.shape; K = K1 - 1


def report(name, s):
    _report(name, s, lab, ns, src)
e = err.mean((3, 4))
prel = pp["pair_err"] / e[..., K:]                           # (N,T,P)
pairs = pp["pairs"]                                          # (N,P,2)
for temp in (20, 50, 100, 200):
    allr = np.concatenate([rel, prel], -1)
    p = torch.softmax(torch.tensor(-temp * allr), -1).numpy()   # (N,T,K+P)
    marg = p[..., :K].copy()
    for i in range(N):
        for q, (a, b) in enumerate(pairs[i]):
            marg[i, :, a] += p[i, :, K + q]; marg[i, :, b] += p[i, :, K + q]
    report(f"singles+pairs marginal T{temp}", marg.mean(1))
    report(f"  singles only T{temp}", torch.softmax(torch.tensor(-temp * rel), -1).numpy().mean(1))
# is the true pair the best pair hypothesis in 2-shape scenes? does it beat best single?
m2 = np.where(ns == 2)[0]
pm = prel.mean(1); sm = rel.mean(1)
hit = []; beat = []
for i in m2:
    truth = tuple(sorted(np.where(lab[i])[0]))
    best = tuple(pairs[i][pm[i].argmin()])
    hit.append(best == truth); beat.append(pm[i].min() < sm[i].min())
print("2-shape: true pair in top-m candidates", np.mean([tuple(sorted(np.where(lab[i])[0])) in [tuple(p) for p in pairs[i]] for i in m2]),
      "best pair == truth", np.mean(hit), "best pair beats best single", np.mean(beat))
m1 = np.where(ns == 1)[0]
print("1-shape: best pair beats best single", np.mean([pm[i].min() < sm[i].min() for i in m1]))
