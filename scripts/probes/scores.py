import sys
import numpy as np
import torch
from common import load, report as _report
d, err, lab, src, ns, rel = load(sys.argv[1])
N, T, K1, H, W = err.shape; K = K1 - 1


def report(name, s):
    _report(name, s, lab, ns, src)
for temp in (20, 50, 100):
    p = torch.softmax(torch.tensor(-temp * rel), -1).numpy()  # (N,T,K)
    report(f"softmax{temp}", p.mean(1))
    # explain away: remove the winner, renormalise
    top = p.argmax(-1)
    rest = p.copy(); np.put_along_axis(rest, top[..., None], 0, -1)
    s2 = rest / rest.sum(-1, keepdims=True)
    report(f"  explain-away max(p, p/(1-top))", np.maximum(p, p / np.maximum(1 - p.max(-1, keepdims=True), 1e-9) * (rest > 0)).mean(1))
    # mean over t' first, then explain away
    pm = p.mean(1); topm = pm.argmax(-1)
    restm = pm.copy(); np.put_along_axis(restm, topm[:, None], 0, -1)
    report(f"  EA after mean", np.maximum(pm, restm / restm.sum(-1, keepdims=True)))
    # two rounds
    for r2 in (2, 3):
        sc = np.zeros_like(pm); rem = pm.copy()
        for _ in range(r2):
            q = rem / rem.sum(-1, keepdims=True)
            sc = np.maximum(sc, q)
            np.put_along_axis(rem, q.argmax(-1)[:, None], 0, -1)
        report(f"  EA rounds {r2}", sc)
# rank-margin: gap between concept's rel and the median rel
med = np.median(rel, -1, keepdims=True)
report("median - rel", (med - rel).mean(1))
report("(median - rel)/ (median - min)", ((med - rel) / (med - rel.min(-1, keepdims=True) + 1e-9)).mean(1))
z = (rel - rel.mean(-1, keepdims=True)) / rel.std(-1, keepdims=True)
report("-zscore", (-z).mean(1))
