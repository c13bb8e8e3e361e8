"""Probe 3: multi-label diffusion classifier: errors under pair prompts "a A and a B" among the top-m singles."""
import sys, itertools
import numpy as np, torch
from irece_runtime.loading import load_pipeline
from irece_runtime import irece
from irece_runtime.pipeline import CLASSIFIER_SEED
from irece_runtime.calls import drive, Call
pipe = load_pipeline(sys.argv[1]); d = np.load(sys.argv[2]); m = int(sys.argv[4])
concepts = list(d["concepts"]); K = len(concepts)
err = d["err"].astype(np.float64); e = err.mean((3, 4)); rel = (e[..., :K] / e[..., K:]).mean(1)
top = rel.argsort(-1)[:, :m]
x0 = torch.tensor(d["x0"]); alphas = pipe.alphas_cumprod
tps = (100, 300, 500)
pair_hidden = {}
def hid(a, b):
    if (a, b) not in pair_hidden:
        pair_hidden[a, b] = pipe.encode_prompt(f"a {concepts[a]} and a {concepts[b]}")
    return pair_hidden[a, b]
pairs = [list(itertools.combinations(sorted(t), 2)) for t in top]
P = len(pairs[0])
out = np.zeros((len(x0), len(tps), P))
with torch.no_grad():
    for j, tp in enumerate(tps):
        xi = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(CLASSIFIER_SEED + j))
        x_tp = irece.renoise(x0, xi, alphas[tp])
        for s in range(0, len(x0), 40):
            idx = range(s, min(s + 40, len(x0)))
            rows = torch.cat([x_tp[i:i + 1].expand(P, -1, -1, -1) for i in idx])
            h = torch.cat([torch.cat([hid(a, b) for a, b in pairs[i]]) for i in idx])
            def mach():
                return (yield Call("eps", (rows, h), torch.tensor(tp), "standard"))
            eps = drive(mach(), pipe.backend)
            out[list(idx), j] = ((eps - xi) ** 2).flatten(1).mean(1).view(len(idx), P).numpy()
np.savez_compressed(sys.argv[3], pair_err=out, pairs=np.array(pairs))
