"""Probe: per-pixel diffusion-classifier errors at t*, for scenes with ground truth (not part of the package)."""
import sys
import numpy as np
import torch
from irece_runtime.loading import load_pipeline
from irece_runtime import irece
from irece_runtime.pipeline import CLASSIFIER_SEED
from irece_runtime.calls import drive, Call
from benchmarks.presence import scene_latents
from miniworld import shapes

model = sys.argv[1]
out = sys.argv[2]
n = int(sys.argv[3])
seed = int(sys.argv[4])
t_star = float(sys.argv[5]) if len(sys.argv) > 5 else 0.5
tps = (100, 300, 500)
steps, guidance = 25, 5.0
pipe = load_pipeline(model)
concepts = pipe.vocabulary
cfg = irece.IreceConfig(t_star=t_star)
step = cfg.step_index(steps)
rng = np.random.default_rng(seed)
items = []
for i in range(n):
    u = rng.random()
    if u < 0.45:
        items.append(shapes.render(shapes.CONCEPTS[i % 10], rng=rng))
    elif u < 0.85:
        items.append(shapes.render_scene(2, rng=rng))
    else:
        items.append(shapes.render_scene(3, rng=rng))
hidden = pipe.classifier_prompts(concepts)
k1 = hidden.shape[0]
alphas = pipe.alphas_cumprod


def classify(x, t):
    b = x.shape[0]
    def machine():
        e0 = yield Call("eps", (x, hidden[-1:].expand(b, -1, -1)), t, "standard")
        x0 = irece.predicted_x0(x, e0, alphas[int(t)])
        errs, epss = [], []
        for j, tp in enumerate(tps):
            xi = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(CLASSIFIER_SEED + j)).to(x0)
            x_tp = irece.renoise(x0, xi, alphas[tp])
            eps = yield Call("eps", (x_tp.repeat_interleave(k1, 0), hidden.repeat(b, 1, 1)), torch.tensor(tp), "standard")
            eps = eps.view(b, k1, *eps.shape[1:])
            errs.append(((eps - xi) ** 2).mean(2))  # (b, K+1, H, W)
            epss.append(eps)
        return torch.stack(errs, 1), torch.stack(epss, 1), x0
    return drive(machine(), pipe.backend)


res = {k: [] for k in ("err", "eps", "label", "gt", "source", "nshapes", "xt", "x0")}
B = 30
with torch.no_grad():
    for source in ("inverted", "text"):
        for s in range(0, n, B):
            chunk = items[s:s + B]
            x_t, t = scene_latents(pipe, chunk, source, seed + s, guidance, steps, step)
            err, eps, x0 = classify(x_t, t)
            res["err"].append(err.numpy()); res["eps"].append(eps.numpy().astype(np.float16))
            res["xt"].append(x_t.numpy()); res["x0"].append(x0.numpy())
            for sc in chunk:
                shown = {sh.concept for sh in sc.shapes}
                res["label"].append([c in shown for c in concepts])
                gt = np.zeros((len(concepts), 32, 32), bool)
                for c, m in sc.masks.items():
                    gt[concepts.index(c)] = m
                res["gt"].append(gt)
                res["source"].append(source); res["nshapes"].append(len(shown))
            print(source, s, flush=True)
np.savez_compressed(out, err=np.concatenate(res["err"]), eps=np.concatenate(res["eps"]),
                    xt=np.concatenate(res["xt"]), x0=np.concatenate(res["x0"]),
                    label=np.array(res["label"]), gt=np.array(res["gt"]), source=np.array(res["source"]),
                    nshapes=np.array(res["nshapes"]), concepts=np.array(concepts))
