"""`irece bench localization`: IRECE's masks against the renderer's ground truth, and DDIM inversion quality."""
from __future__ import annotations

import numpy as np

from irece_runtime.backends.torch_backend import require_torch
from irece_runtime.images import to_tensor
from irece_runtime.irece import IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld.assets import MODEL_DIR as DEFAULT_MODEL
from miniworld import shapes

from . import batch as gen
from .stats import psnr

LOC_SEED = 8_000_000
DEFAULTS = IreceConfig.defaults()


def pixel_mask(mask: np.ndarray, side: int = shapes.SIZE) -> np.ndarray:
    """A latent-resolution mask (h, w) as a boolean mask of the (side, side) image, nearest-neighbour upsampled."""
    f = side // mask.shape[-1]
    return np.kron(mask, np.ones((f, f))) > 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def masks_for(pipe, images: np.ndarray, concepts: list[str], tau: float, t_star, steps: int, gate: str = "off",
              threshold: float = DEFAULTS.threshold, grow: int = 0) -> np.ndarray:
    """Invert with the standard model (null prompt), localize each image's concept at t*: (N, h, w) masks
    (images grouped by concept, one batch each)."""
    x_T = gen.invert_images(pipe, images, "standard", steps)
    out: list = [None] * len(concepts)
    for c in dict.fromkeys(concepts):
        idx = [k for k, ck in enumerate(concepts) if ck == c]
        cfg = IreceConfig(concepts=(c,), tau=tau, t_star=t_star, gate=gate, threshold=threshold, grow=grow)
        _, m = gen.from_latents(pipe, x_T[idx], "", cfg, steps=steps)
        for k, mk in zip(idx, m):
            out[k] = mk
    return np.stack(out)


def run(model_dir: str = str(DEFAULT_MODEL), n: int = 100, n_pairs: int = 20, tau: float = DEFAULTS.tau,
        t_star=DEFAULTS.t_star, steps: int = 25, layers: tuple[str, ...] | None = None, gate: str = "off",
        threshold: float = DEFAULTS.threshold, grow: int = 0) -> dict:
    pipe = load_pipeline(model_dir, layers=layers)
    localizer = require_torch(pipe.backend, "the localization benchmark (it reports the localizer's layers)").localizer
    rng = np.random.default_rng(LOC_SEED)
    scenes = [shapes.render(shapes.CONCEPTS[i % 10], rng=rng) for i in range(n)]
    images = np.stack([s.image for s in scenes])
    masks = masks_for(pipe, images, [s.label for s in scenes], tau, t_star, steps, gate, threshold, grow)
    ious = [iou(pixel_mask(m), s.mask) for m, s in zip(masks, scenes)]
    # chance: the same masks scored against other images' shapes (a localizer that ignores the image)
    chance = [iou(pixel_mask(m), s.mask) for m, s in zip(masks, scenes[7:] + scenes[:7])]
    per_concept = {c: float(np.mean([v for v, s in zip(ious, scenes) if s.label == c])) for c in shapes.CONCEPTS}
    pairs = [shapes.render_scene(2, rng=rng) for _ in range(n_pairs)]
    own_cover, other_cover = [], []
    for k in range(2):  # each shape of each pair as the target in turn
        targets = [p.shapes[k].concept for p in pairs]
        pm = masks_for(pipe, np.stack([p.image for p in pairs]), targets, tau, t_star, steps, gate, threshold, grow)
        for p, c, m in zip(pairs, targets, pm):
            other = p.shapes[1 - k].concept
            m = pixel_mask(m)
            own_cover.append((m & p.masks[c]).sum() / p.masks[c].sum())
            other_cover.append((m & p.masks[other]).sum() / p.masks[other].sum())
    # inversion round trip (standard model, null prompt): reconstruction PSNR, and the VAE alone for reference
    x_T = gen.invert_images(pipe, images[:min(n, 50)], "standard", steps)
    recon, _ = gen.from_latents(pipe, x_T, "", None, steps=steps)
    vae_only = gen.decode(pipe, pipe.backend.vae_encode(to_tensor(images[:50])))
    return {"n": n, "tau": tau, "t_star": t_star, "steps": steps, "gate": gate, "grow": grow,
            "layers": list(localizer.layer_names),
            "mean_iou": float(np.mean(ious)), "chance_iou": float(np.mean(chance)),
            "mask_area": float(masks.mean()),
            "iou_per_concept": per_concept, "pairs": n_pairs,
            "pair_own_coverage": float(np.mean(own_cover)), "pair_other_coverage": float(np.mean(other_cover)),
            "pair_own_gt_other": float(np.mean(np.array(own_cover) > np.array(other_cover))),
            "inversion_psnr_db": float(np.mean([psnr(a, b) for a, b in zip(recon, images)])),
            "vae_psnr_db": float(np.mean([psnr(a, b) for a, b in zip(vae_only, images)]))}


def head_targets(model_dir: str = str(DEFAULT_MODEL), n: int = 48, n_pairs: int = 48) -> dict:
    """The cells `irece head train` takes as its targets (head_training.targets: the model's cross-attention x
    DiffEdit contrast on the clean image under the prompt naming the shapes, spread along self-attention, regions
    named by denoising error) against the renderer's masks: single-shape renders and two-shape scenes, pixel IoU.
    The head cannot learn better cells than these."""
    import torch

    from irece_runtime import head_training
    from irece_runtime.attention import SelfAttentionPropagation

    pipe = load_pipeline(model_dir)
    spread = SelfAttentionPropagation(require_torch(pipe.backend, "the head-targets benchmark").unets["standard"])
    rng = np.random.default_rng(LOC_SEED + 1)
    out = {"n": n, "n_pairs": n_pairs}
    for name, scenes in (("single", [shapes.render_scene(1, rng=rng) for _ in range(n)]),
                         ("pairs", [shapes.render_scene(2, rng=rng) for _ in range(n_pairs)])):
        named = [tuple(s.concept for s in sc.shapes) for sc in scenes]
        prompts = [head_training.caption(cs) for cs in named]
        with torch.no_grad():
            x0 = pipe.backend.vae_encode(to_tensor(np.stack([sc.image for sc in scenes])))
            y = head_training.targets(pipe, spread, x0, prompts, named, tuple(shapes.CONCEPTS), LOC_SEED).numpy()
        masks = {(k, c): pixel_mask(y[k, shapes.CONCEPTS.index(c)]) for k, cs in enumerate(named) for c in cs}
        out[f"{name}_iou"] = float(np.mean([iou(m, scenes[k].masks[c]) for (k, c), m in masks.items()]))
        # chance: the same masks against another scene's shape of the same rank
        out[f"{name}_chance_iou"] = float(np.mean([iou(m, scenes[(k + 5) % len(scenes)].masks[
            named[(k + 5) % len(scenes)][named[k].index(c)]]) for (k, c), m in masks.items()]))
        out[f"{name}_area"] = float(y.sum(1).mean())
    return out
