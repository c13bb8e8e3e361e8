"""Probe 4: the classifier on clean latents of the renders (upper bound for the t* x0 estimate)."""
import sys, numpy as np, torch
from irece_runtime.loading import load_pipeline
from irece_runtime import irece
from irece_runtime.pipeline import CLASSIFIER_SEED
from irece_runtime.images import to_tensor
from irece_runtime.calls import drive, Call
from miniworld import shapes
pipe = load_pipeline(sys.argv[1]); n = int(sys.argv[3]); seed = int(sys.argv[4])
rng = np.random.default_rng(seed); items = []
for i in range(n):
    u = rng.random()
    if u < 0.45: items.append(shapes.render(shapes.CONCEPTS[i % 10], rng=rng))
    elif u < 0.85: items.append(shapes.render_scene(2, rng=rng))
    else: items.append(shapes.render_scene(3, rng=rng))
concepts = pipe.vocabulary; hidden = pipe.classifier_prompts(concepts); k1 = hidden.shape[0]; alphas = pipe.alphas_cumprod
with torch.no_grad():
    x0 = pipe.backend.vae_encode(to_tensor(np.stack([s.image for s in items])))
    errs = []
    for j, tp in enumerate((100, 300, 500)):
        xi = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(CLASSIFIER_SEED + j))
        x_tp = irece.renoise(x0, xi, alphas[tp]); b = len(x0)
        def mach():
            return (yield Call("eps", (x_tp.repeat_interleave(k1, 0), hidden.repeat(b, 1, 1)), torch.tensor(tp), "standard"))
        eps = drive(mach(), pipe.backend).view(b, k1, *x0.shape[1:])
        errs.append(((eps - xi) ** 2).mean(2).numpy())
lab = np.array([[c in {sh.concept for sh in s.shapes} for c in concepts] for s in items])
np.savez_compressed(sys.argv[2], err=np.stack(errs, 1), label=lab, source=np.array(["inverted"] * n),
                    nshapes=np.array([len(s.shapes) for s in items]), concepts=np.array(concepts))
