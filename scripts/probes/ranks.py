import sys, numpy as np
d = np.load(sys.argv[1]); err = d["err"].astype(np.float64); lab, src, ns = d["label"], d["source"], d["nshapes"]
N, T, K1, H, W = err.shape; K = K1 - 1
e = err.mean((3, 4)); rel = e[..., :K] / e[..., K:]
for tname, r in [("t'100", rel[:, 0]), ("t'300", rel[:, 1]), ("t'500", rel[:, 2]), ("mean", rel.mean(1))]:
    rk = r.argsort(-1).argsort(-1)  # 0 = best
    for k in (1, 2, 3):
        m = ns == k
        pr = rk[m][lab[m]]
        print(tname, k, "present ranks hist", np.bincount(pr, minlength=K)[:6], "in top-k", np.mean(pr < k).round(2))
