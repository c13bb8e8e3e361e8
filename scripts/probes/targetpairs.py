"""Multi-label presence of a target: hypotheses = the K single prompts + the K - 1 pair prompts "a target and a j";
the target's score is its marginal (its single + every pair with it). Needs pairs.py run with m = K (all pairs)."""
import sys
import numpy as np
import torch
from common import load, report as _report
d, err, lab, src, ns, rel = load(sys.argv[1]); pp = np.load(sys.argv[2])
N, T, K1, H, W = err.shape; K = K1 - 1


def report(name, s):
    _report(name, s, lab, ns, src)
e = err.mean((3, 4))
prel = pp["pair_err"] / e[..., K:]; pairs = pp["pairs"][0]  # the same all-pairs list for every image
idx = {tuple(sorted(p)): q for q, p in enumerate(pairs)}
for ts, tname in (((0, 1, 2), "t' 100,300,500"), ((1,), "t' 300")):
    for temp in (50,):
        r, pr = rel[:, ts], prel[:, ts]
        report(f"singles softmax {tname}", torch.softmax(torch.tensor(-temp * r), -1).numpy().mean(1))
        score = np.zeros((N, K))
        for k in range(K):
            cols = [idx[tuple(sorted((k, j)))] for j in range(K) if j != k]
            hyp = np.concatenate([r, pr[..., cols]], -1)  # (N, T, K + K - 1)
            p = torch.softmax(torch.tensor(-temp * hyp), -1).numpy()
            score[:, k] = (p[..., k] + p[..., K:].sum(-1)).mean(1)
        report(f"target + target-pairs marginal {tname}", score)
        allh = np.concatenate([r, pr], -1); p = torch.softmax(torch.tensor(-temp * allh), -1).numpy()
        marg = p[..., :K].copy()
        for q, (a, b) in enumerate(pairs):
            marg[..., a] += p[..., K + q]; marg[..., b] += p[..., K + q]
        report(f"all pairs marginal {tname}", marg.mean(1))
# pairs only among each image's top-m single prompts (a second call after the singles: m(m-1)/2 rows per t')
r, pr = rel, prel
order = r.mean(1).argsort(-1)
for m in (3, 4, 5, 6, 8):
    score = np.zeros((N, K))
    for i in range(N):
        top = sorted(order[i, :m])
        cols = [idx[(a, b)] for a in top for b in top if a < b]
        hyp = np.concatenate([r[i], pr[i][:, cols]], -1)
        p = torch.softmax(torch.tensor(-50 * hyp), -1).numpy()
        marg = p[:, :K].copy()
        for q, c in enumerate(cols):
            a, b = pairs[c]; marg[:, a] += p[:, K + q]; marg[:, b] += p[:, K + q]
        score[i] = marg.mean(0)
    report(f"pairs among top-{m} marginal (all t')", score)
