import sys, numpy as np
d = np.load(sys.argv[1]); mp = np.load(sys.argv[2])
lab, gt, src, ns = d["label"], d["gt"], d["source"], d["nshapes"]
inv = np.where(src == "inverted")[0]
def up(m): return np.kron(m, np.ones((4, 4))) > 0.5
def mm(a): lo, hi = a.min(), a.max(); return (a - lo) / (hi - lo + 1e-12)
def stats(name, fn):
    ious, own, oth = [], [], []
    for i in inv:
        pres = np.where(lab[i])[0]
        for k in pres:
            mu = up(fn(i, k, pres))
            if ns[i] == 1: ious.append((mu & gt[i, k]).sum() / max((mu | gt[i, k]).sum(), 1))
            else:
                own.append((mu & gt[i, k]).sum() / gt[i, k].sum())
                oth.append(max((mu & gt[i, j]).sum() / gt[i, j].sum() for j in pres if j != k))
    own, oth = np.array(own), np.array(oth)
    print(f"{name:44s} IoU1 {np.mean(ious):.3f} own {own.mean():.2f} other {oth.mean():.2f} split {np.mean((own >= .5) & (oth < .25)):.2f}")
for key in ("paper", "short", "contrastive"):
    M = mp[key]
    for tau in (0.4, 0.5, 0.6):
        stats(f"{key} minmax tau{tau}", lambda i, k, p: mm(M[i, k]) >= tau)
        # split among present concepts (which the gate knows)
        stats(f"{key} tau{tau} & own>=others present", lambda i, k, p: (mm(M[i, k]) >= tau) & np.all([M[i, k] >= M[i, j] for j in p if j != k] or [True], 0))
        # share of the present concepts' normalised maps
        stats(f"{key} tau{tau} & own mm >= others mm", lambda i, k, p: (mm(M[i, k]) >= tau) & np.all([mm(M[i, k]) >= mm(M[i, j]) for j in p if j != k] or [True], 0))
