import sys
import numpy as np
import torch
import torch.nn.functional as F
from common import report as _report

d = np.load(sys.argv[1])
err, eps = d["err"].astype(np.float64), d["eps"].astype(np.float32)  # (N,T,K+1,H,W), (N,T,K+1,C,H,W)
lab, gt, src, ns = d["label"], d["gt"], d["source"], d["nshapes"]
N, T, K1, H, W = err.shape
K = K1 - 1


def report(name, s):
    _report(name, s, lab, ns, src)


e_img = err.mean((3, 4))  # (N,T,K+1)
rel = e_img[..., :K] / e_img[..., K:]
report("softmax50 (current)", torch.softmax(torch.tensor(-50 * rel), -1).mean(1).numpy())
report("reduction 1-rel", (1 - rel).mean(1))
red = (1 - rel)
report("reduction / max reduction", (red / np.maximum(red.max(-1, keepdims=True), 1e-9)).mean(1))
# spatial
g = (err[:, :, K:] - err[:, :, :K])  # gain (N,T,K,H,W) positive where concept helps
gn = g / err[:, :, K:].mean((3, 4), keepdims=True)  # relative to the image's null error
gpool = F.avg_pool2d(torch.tensor(gn.mean(1)), 3, stride=1, padding=1).numpy()  # (N,K,H,W)
report("spatial gain max (3x3)", gpool.reshape(N, K, -1).max(-1))
gpool2 = F.avg_pool2d(torch.tensor(gn.mean(1)), 2, stride=1).numpy()
report("spatial gain max (2x2)", gpool2.reshape(N, K, -1).max(-1))
report("spatial gain max (1x1)", gn.mean(1).reshape(N, K, -1).max(-1))
for temp in (20, 50, 100):
    relp = err[:, :, :K] / err[:, :, K:]  # (N,T,K,H,W)
    share = torch.softmax(torch.tensor(-temp * relp), 2).mean(1)  # (N,K,H,W)
    obj = torch.tensor(gn.mean(1).max(1))  # (N,H,W) best gain per cell
    w = (obj / obj.flatten(1).max(1).values[:, None, None]).clamp_min(0)
    sc = F.avg_pool2d(share * w[:, None], 3, 1, 1) / F.avg_pool2d(w[:, None].expand_as(share), 3, 1, 1).clamp_min(1e-9)
    report(f"pixel softmax{temp} weighted local", sc.flatten(2).max(2).values.numpy())
    sc2 = (share * w[:, None]).flatten(2).sum(2) / w.flatten(1).sum(1)[:, None]
    report(f"pixel softmax{temp} weighted mean", sc2.numpy())

# masks: IoU for present concepts of inverted scenes
inv = src == "inverted"


def up(m):
    return np.kron(m, np.ones((4, 4))) > 0.5


def cov_cells(g):  # (32,32) bool -> (8,8) coverage
    return g.reshape(8, 4, 8, 4).mean((1, 3))


def minmax(a):
    f = a.reshape(a.shape[0], -1)
    lo, hi = f.min(1, keepdims=True), f.max(1, keepdims=True)
    return ((f - lo) / (hi - lo + 1e-12)).reshape(a.shape)


def mask_stats(name, maskfn):
    ious1, own, other, psn = [], [], [], []
    for i in np.where(inv)[0]:
        present = np.where(lab[i])[0]
        for k in present:
            m = maskfn(i, k)
            mu = up(m)
            if ns[i] == 1:
                ious1.append((mu & gt[i, k]).sum() / max((mu | gt[i, k]).sum(), 1))
            else:
                own.append((mu & gt[i, k]).sum() / gt[i, k].sum())
                oth = [j for j in present if j != k]
                other.append(max((mu & gt[i, j]).sum() / gt[i, j].sum() for j in oth))
    own, other = np.array(own), np.array(other)
    print(f"{name:40s} IoU(single) {np.mean(ious1):.3f}  pairs own {own.mean():.2f} other {other.mean():.2f} "
          f"own>=.5&other<.2 {np.mean((own >= .5) & (other < .2)):.2f}  area {np.mean([maskfn(i, k).mean() for i in np.where(inv)[0][:40] for k in np.where(lab[i])[0]]):.2f}")


mask_stats("oracle cov>=0.5", lambda i, k: cov_cells(gt[i, k]) >= 0.5)
gm = gn.mean(1)  # (N,K,H,W)
for tau in (0.3, 0.4, 0.5):
    mask_stats(f"gain minmax tau{tau}", lambda i, k: minmax(gm[i, k][None])[0] >= tau)
dn = np.abs(eps[:, :, :K] - eps[:, :, K:]).mean(3).mean(1)  # DiffEdit vs null (N,K,H,W)
for tau in (0.3, 0.4, 0.5):
    mask_stats(f"diffedit-null tau{tau}", lambda i, k: minmax(dn[i, k][None])[0] >= tau)
mean_other = (eps[:, :, :K].sum(2, keepdims=True) - eps[:, :, :K]) / (K - 1)
do = np.abs(eps[:, :, :K] - mean_other).mean(3).mean(1)
for tau in (0.3, 0.4, 0.5):
    mask_stats(f"diffedit-others tau{tau}", lambda i, k: minmax(do[i, k][None])[0] >= tau)
# contrastive gain: k's gain beats every other concept's and is a fair share of the best
for frac in (0.2, 0.35, 0.5):
    def mfn(i, k, frac=frac):
        gk = gm[i, k]
        best_other = np.delete(gm[i], k, 0).max(0)
        return (gk >= best_other) & (gk >= frac * gm[i].max())
    mask_stats(f"gain argmax & >= {frac} max", mfn)
    def mfn2(i, k, frac=frac):
        gk = gm[i, k]
        best_other = np.delete(gm[i], k, 0).max(0)
        return (gk >= best_other) & (gk >= frac * gk.max())
    mask_stats(f"gain argmax & >= {frac} own max", mfn2)
