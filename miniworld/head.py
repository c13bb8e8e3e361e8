"""`irece world head`: train the concept head (irece_runtime/concept_head.py) of a model folder on the mini world.

Data: scenes of zero to three shapes (seeds from HEAD_SEED: no benchmark or test uses them), each seen along the
standard model's own trajectories, as IRECE sees requests at t*: its render DDIM-inverted with the null prompt and
regenerated, and its caption generated from noise. At each schedule point in `t_points` the standard UNet's
features of x_t (null prompt) are recorded. Targets: on inverted renders, each cell's share covered by each
concept's ground-truth mask (the renderer's); on generated captions, where the model drew the shapes is unknown,
so only the image's labels count there (the highest cell per concept against the caption's concepts).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from irece_runtime.calls import drive
from irece_runtime.concept_head import FEATURE_BLOCKS, ConceptHead, UNetFeatures, head_config, save_head
from irece_runtime.images import to_tensor
from irece_runtime.pipeline import guided_eps, sample

from . import shapes

HEAD_SEED = 6_000_000
T_POINTS = (0.3, 0.5, 0.7)  # the default t*, the benchmarks' t* and the first recheck
SCENE_SIZES = (0, 1, 1, 2, 2, 3)  # shapes per scene, drawn uniformly from this list (0: background only)


def scenes(n: int, seed: int = HEAD_SEED) -> list[shapes.Scene]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.choice(SCENE_SIZES))
        out.append(shapes.render(shapes.NO_SHAPE, rng=rng) if k == 0 else shapes.render_scene(k, rng=rng))
    return out


def cell_cover(scene: shapes.Scene, concepts: tuple[str, ...], side: int) -> np.ndarray:
    """(K, side, side): the share of each latent cell each concept's ground-truth mask covers."""
    f = shapes.SIZE // side
    y = np.zeros((len(concepts), side, side), np.float32)
    for c, m in scene.masks.items():
        y[concepts.index(c)] = m.reshape(side, f, side, f).mean((1, 3))
    return y


class _Enough(Exception):
    pass


def _latents_at(pipe, x, cond, uncond, guidance, steps, at) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(t, x_t) at the schedule indices `at` on the standard model's sampler from x (no IRECE)."""
    seen = []

    def capture(i, t, x_t):
        if i in at:
            seen.append((t, x_t))
            if len(seen) == len(at):
                raise _Enough
        return x_t
    try:
        drive(sample(guided_eps("standard", cond, uncond, guidance), x, pipe.scheduler(steps), (capture,)),
              pipe.backend)
    except _Enough:
        pass
    return seen


@torch.no_grad()
def collect(pipe, items: list, features: UNetFeatures, concepts: tuple[str, ...], t_points=T_POINTS,
            steps: int = 25, guidance: float = 5.0, seed: int = HEAD_SEED, batch: int = 64):
    """(features (N, D, h, w), targets (N, K, h, w), spatial (N,) bool: whether the targets are cell-level)."""
    null = pipe.null_hidden
    at = sorted({min(steps - 1, int(round(p * steps))) for p in t_points})
    X, Y, S = [], [], []
    for s in tqdm(range(0, len(items), batch), desc="head data"):
        chunk = items[s:s + batch]
        b = len(chunk)
        side = pipe.sample_size
        cover = torch.from_numpy(np.stack([cell_cover(sc, concepts, side) for sc in chunk]))
        labels = (cover.flatten(2).amax(2) > 0)[:, :, None, None].float().expand_as(cover)
        x_inv = pipe.invert(pipe.backend.vae_encode(to_tensor(np.stack([sc.image for sc in chunk]))), null,
                            "standard", steps)
        noise = torch.cat([torch.randn((1, pipe.backend.latent_channels, side, side),
                                       generator=torch.Generator().manual_seed(seed + s + k)) for k in range(b)])
        prompts = torch.cat([pipe.encode_prompt(sc.prompt()) if sc.shapes else null for sc in chunk])
        for x, cond, target, spatial in ((x_inv, null.expand(b, -1, -1), cover, True),
                                         (noise, prompts, labels, False)):
            for t, x_t in _latents_at(pipe, x, cond, null.expand(b, -1, -1), guidance, steps, at):
                X.append(features(x_t, t, null.expand(b, -1, -1))[1])
                Y.append(target)
                S.append(torch.full((b,), spatial))
    return torch.cat(X), torch.cat(Y), torch.cat(S)


def head_loss(logits: torch.Tensor, target: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """Cell-level BCE where the targets are cells; elsewhere BCE of each concept's highest cell (image labels)."""
    cell = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3))
    pooled = F.binary_cross_entropy_with_logits(logits.flatten(2).amax(2), target.flatten(2).amax(2),
                                                reduction="none").mean(1)
    return torch.where(spatial, cell, pooled).mean()


def fit(X, Y, S, concepts, hidden: int = 64, epochs: int = 80, lr: float = 3e-3, seed: int = 0) -> ConceptHead:
    torch.manual_seed(seed)
    head = ConceptHead(X.shape[1], concepts, hidden)
    head.mean.copy_(X.mean((0, 2, 3)))
    head.std.copy_(X.std((0, 2, 3)) + 1e-5)
    opt = torch.optim.AdamW(head.net.parameters(), lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="head fit"):
        perm = torch.randperm(len(X), generator=g)
        for b in range(0, len(X), 128):
            idx = perm[b:b + 128]
            loss = head_loss(head.logits(X[idx]), Y[idx], S[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return head.eval()


def train_head(model_dir: str | Path, n: int = 2304, t_points=T_POINTS, epochs: int = 80, hidden: int = 64,
               blocks: tuple[str, ...] = FEATURE_BLOCKS, out: str | Path | None = None) -> dict:
    """Train the head of `model_dir` on its standard UNet and write it to `out` (default: the model folder)."""
    from irece_runtime.loading import load_pipeline

    t0 = time.time()
    pipe = load_pipeline(model_dir)
    concepts = tuple(pipe.vocabulary or shapes.CONCEPTS)
    feats = UNetFeatures(pipe.backend.unets["standard"], blocks)
    X, Y, S = collect(pipe, scenes(n), feats, concepts, t_points)
    head = fit(X, Y, S, concepts, hidden, epochs)
    cfg = head_config(head, blocks, list(t_points), scenes=n, epochs=epochs, seed=HEAD_SEED)
    path = save_head(out or model_dir, head, cfg)
    return {"path": str(path), "examples": int(len(X)), "seconds": round(time.time() - t0, 1), **cfg}
