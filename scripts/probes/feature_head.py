"""Probe: a per-cell concept head on the standard UNet's own features at t* (Baranchuk et al. 2022, "label-efficient
segmentation with diffusion models"), as presence score and concept-specific mask.

Features: the outputs of down_blocks[0], the mid block and both up blocks (nearest-upsampled to the latent grid) of
one standard-UNet pass with the null prompt at x_t, and optionally of x0-hat re-noised at each t' (fixed noise).
Trained on renders of 0-3 shapes (calibration seeds) from both sources (text prompts naming the shapes, renders
inverted with the null prompt), per-cell multi-label BCE against the renderer's masks (cell coverage); presence =
the highest cell probability, mask = cells >= 0.5. Held out: 200 other scenes.

python scripts/probes/feature_head.py [n_train] [t_star] [t_primes, e.g. 100 or 50,200] [keep t* features: 1|0]
    [heads, e.g. linear,mlp,conv3]
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.localization import iou, pixel_mask
from benchmarks.presence import auc, constrained_threshold, scene_latents
from irece_runtime.irece import IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld import shapes

torch.set_num_threads(2)
N_TRAIN = int(sys.argv[1]) if len(sys.argv) > 1 else 384
T_STAR = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
STEPS, GUIDE = 25, 5.0
pipe = load_pipeline("miniworld/models/shapes10")
unet = pipe.backend.unets["standard"]
C = list(shapes.CONCEPTS)
feats = {}


def hook(name):
    def f(mod, inp, out):
        feats[name] = out[0] if isinstance(out, tuple) else out
    return f


for name, mod in [("down0", unet.down_blocks[0]), ("mid", unet.mid_block), ("up0", unet.up_blocks[0]),
                  ("up1", unet.up_blocks[1])]:
    mod.register_forward_hook(hook(name))


T_PRIMES = tuple(int(v) for v in sys.argv[3].split(",") if v) if len(sys.argv) > 3 else ()
KEEP_TSTAR = len(sys.argv) <= 4 or sys.argv[4] == "1"


def _pass(x, t):
    with torch.no_grad():
        eps = unet(x, t, pipe.null_hidden.expand(len(x), -1, -1)).sample
    h = x.shape[-1]
    parts = [F.interpolate(feats[k], size=(h, h), mode="nearest") if feats[k].shape[-1] != h else feats[k]
             for k in ("down0", "mid", "up0", "up1")]
    return eps, torch.cat(parts, 1)


def features(x_t, t):
    """features at t* and, per t' in T_PRIMES, of x0-hat re-noised there with fixed noise"""
    from irece_runtime import irece
    eps, f = _pass(x_t, t)
    out = [f] if KEEP_TSTAR else []
    a = pipe.alphas_cumprod
    x0 = irece.predicted_x0(x_t, eps, a[int(t)])
    for j, tp in enumerate(T_PRIMES):
        xi = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(123 + j))
        out.append(_pass(irece.renoise(x0, xi, a[tp]), torch.tensor(tp))[1])
    return torch.cat(out, 1)


def scene_set(n, seed):
    rng = np.random.default_rng(seed)
    return [shapes.render_scene(int(rng.choice([1, 1, 2, 2, 3])), rng=rng) if rng.random() < 0.9
            else shapes.render(shapes.NO_SHAPE, rng=rng) for _ in range(n)]


def cell_targets(scenes, side):
    f = shapes.SIZE // side
    y = np.zeros((len(scenes), len(C), side, side), np.float32)
    for i, sc in enumerate(scenes):
        for c, m in sc.masks.items():
            y[i, C.index(c)] = m.reshape(side, f, side, f).mean((1, 3))
    return torch.from_numpy(y)


CLASSIFIER = {}  # source -> (N, K) scores of the diffusion-classifier gate on the same held-out x_t (env CLASSIFIER=1)


def collect(scenes, seed, source, classify=False):
    cfg = IreceConfig(t_star=T_STAR, gate="classifier")
    step = cfg.step_index(STEPS)
    X, S = [], []
    for s in range(0, len(scenes), 64):
        x_t, t = scene_latents(pipe, scenes[s:s + 64], source, seed + s, GUIDE, STEPS, step)
        X.append(features(x_t, t))
        if classify:
            S.append(pipe.presence(x_t, t, cfg).numpy())
    if classify:
        CLASSIFIER[source] = np.concatenate(S)
    return torch.cat(X)


t0 = time.time()
train = scene_set(N_TRAIN, 7_100_000)
held = scene_set(200, 7_200_000)
Xtr = torch.cat([collect(train, 7_100_000, "inverted"), collect(train, 7_100_000, "text")])
Ytr = torch.cat([cell_targets(train, 8)] * 2)
classify = os.environ.get("CLASSIFIER") == "1"
Xte_inv, Xte_txt = collect(held, 7_200_000, "inverted", classify), collect(held, 7_200_000, "text", classify)
Yte = cell_targets(held, 8)
print(f"features {tuple(Xtr.shape)} in {time.time() - t0:.0f}s", flush=True)
mu, sd = Xtr.mean((0, 2, 3), keepdim=True), Xtr.std((0, 2, 3), keepdim=True) + 1e-5


def fit(kind, epochs=300):
    d = Xtr.shape[1]
    torch.manual_seed(0)
    if kind == "linear":
        net = torch.nn.Conv2d(d, len(C), 1)
    elif kind == "mlp":
        net = torch.nn.Sequential(torch.nn.Conv2d(d, 64, 1), torch.nn.SiLU(), torch.nn.Conv2d(64, len(C), 1))
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(d, 64, 3, padding=1), torch.nn.SiLU(),
                                  torch.nn.Conv2d(64, len(C), 3, padding=1))
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-2)
    Xn = (Xtr - mu) / sd
    for ep in range(epochs):
        perm = torch.randperm(len(Xn))
        for b in range(0, len(Xn), 128):
            idx = perm[b:b + 128]
            loss = F.binary_cross_entropy_with_logits(net(Xn[idx]), Ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def evaluate(name, net):
    for src, X in (("inverted", Xte_inv), ("text", Xte_txt)):
        if net is None:  # the classifier gate's scores (contrast set = the model's concepts, in C's order)
            score, p = CLASSIFIER[src], None
        else:
            with torch.no_grad():
                p = torch.sigmoid(net((X - mu) / sd))
            score = p.flatten(2).amax(2).numpy()
        present = (Yte.flatten(2).amax(2) >= 0.5).numpy() if src == "inverted" else np.array(
            [[c in sc.masks for c in C] for sc in held])
        ns = np.array([len(sc.shapes) for sc in held])
        a = auc(present.ravel(), score.ravel())
        a2 = auc(present[ns == 2].ravel(), score[ns == 2].ravel())
        thr = constrained_threshold(present.ravel(), score.ravel(), 0.03)
        tpr = (score[present] >= thr).mean()
        line = f"{name:7s} {src:8s} AUC {a:.3f} (2 shapes {a2:.3f}) TPR@3%FP {tpr:.2f}"
        if src == "inverted" and p is not None:
            ious, own, other = [], [], []
            for i, sc in enumerate(held):
                for c, m in sc.masks.items():
                    pm = pixel_mask((p[i, C.index(c)] >= 0.5).numpy())
                    if len(sc.shapes) == 1:
                        ious.append(iou(pm, m))
                    else:
                        own.append((pm & m).sum() / m.sum())
                        others = [mm for cc, mm in sc.masks.items() if cc != c]
                        other.append(max((pm & mm).sum() / mm.sum() for mm in others))
            line += f" | single IoU {np.mean(ious):.3f} | multi own {np.mean(own):.2f} other {np.mean(other):.2f}"
            best = {}  # the mask's cut chosen on the held-out scenes themselves: an upper bound for this head
            for cut in (0.1, 0.2, 0.3, 0.4):
                best[cut] = np.mean([iou(pixel_mask((p[i, C.index(c)] >= cut).numpy()), m)
                                     for i, sc in enumerate(held) if len(sc.shapes) == 1 for c, m in sc.masks.items()])
            line += " | IoU at cut " + " ".join(f"{k}:{v:.3f}" for k, v in best.items())
            own2, other2 = [], []
            for i, sc in enumerate(held):
                for c, m in sc.masks.items():
                    if len(sc.shapes) > 1:
                        pm = pixel_mask((p[i, C.index(c)] >= 0.2).numpy())
                        own2.append((pm & m).sum() / m.sum())
                        other2.append(max((pm & mm).sum() / mm.sum() for cc, mm in sc.masks.items() if cc != c))
            line += f" | multi at cut 0.2: own {np.mean(own2):.2f} other {np.mean(other2):.2f}"
        print(line, flush=True)


if classify:
    evaluate("gate", None)
for kind in (sys.argv[5] if len(sys.argv) > 5 else "linear,mlp,conv3").split(","):
    t0 = time.time()
    net = fit(kind)
    print(f"{kind} fit {time.time() - t0:.0f}s", flush=True)
    evaluate(kind, net)
