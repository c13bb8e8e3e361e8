import sys, numpy as np, torch
from benchmarks.presence import auc
d = np.load(sys.argv[1]); pp = np.load(sys.argv[2])
err = d["err"].astype(np.float64); lab, src, ns = d["label"], d["source"], d["nshapes"]
N, T, K1, H, W = err.shape; K = K1 - 1
e = err.mean((3, 4)); rel = e[..., :K] / e[..., K:]          # (N,T,K)
prel = pp["pair_err"] / e[..., K:]                           # (N,T,P)
pairs = pp["pairs"]                                          # (N,P,2)
def report(name, s):
    out = [f"{name:34s} AUC {auc(lab.ravel(), s.ravel()):.3f}"]
    for k in (1, 2, 3):
        m = ns == k; out.append(f"{k}:{auc(lab[m].ravel(), s[m].ravel()):.3f}")
    for so in ("text", "inverted"):
        m = src == so; out.append(f"{so[:3]}:{auc(lab[m].ravel(), s[m].ravel()):.3f}")
    thr = np.quantile(s[lab], 0.1); out.append(f"| FPR@TPR.9 {(s[~lab] >= thr).mean():.3f}")
    print(" ".join(out))
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
