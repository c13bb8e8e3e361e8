"""Batched generation (benchmarks, checks, the demo): many images through the one denoising loop."""
from __future__ import annotations

import numpy as np
import torch

from irece_runtime.irece import IreceConfig
from irece_runtime.images import to_tensor, to_uint8
from irece_runtime.pipeline import Pipeline


def decode(pipe: Pipeline, x: torch.Tensor, report=None, trajectory: list | None = None) -> np.ndarray:
    """Latents -> uint8 images (Pipeline.decode: with keep_outside's trajectory, the pixels outside IRECE's mask too)."""
    return to_uint8(pipe.decode(x, report, trajectory))


def noise(pipe: Pipeline, seeds: list[int]) -> torch.Tensor:
    e, side = pipe.backend, pipe.sample_size
    return torch.cat([torch.randn((1, e.latent_channels, side, side), generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def from_prompts(pipe: Pipeline, prompts: list[str], seeds: list[int], cfg: IreceConfig | None,
                 learned: dict | None = None, steps: int = 25, guidance: float = 5.0, batch: int = 64):
    """Text or learned-embedding prompts -> (uint8 images, union masks (N, h, w) or None)."""
    uncond = pipe.encode_prompt("")
    images, masks = [], []
    for s in range(0, len(prompts), batch):
        cond = torch.cat([pipe.encode_prompt(p, learned) for p in prompts[s:s + batch]])
        x, rep = pipe.denoise(noise(pipe, seeds[s:s + batch]), cond, uncond, guidance, steps, cfg, seeds[s],
                              learned=bool(learned))
        images.append(decode(pipe, x))
        masks.append(rep.mask if rep is not None else None)
    return np.concatenate(images), (torch.cat(masks).cpu().numpy() if masks[0] is not None else None)


def invert_images(pipe: Pipeline, images: np.ndarray, invert_with: str, steps: int = 25,
                  inversion_prompt: str = "", batch: int = 64, trajectory: list | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> x_T latents by DDIM inversion with the chosen model. `trajectory` (a list) receives
    the inversion's latents, input first (steps + 1 of (N, C, h, w)), for IreceConfig.keep_outside."""
    hidden = pipe.encode_prompt(inversion_prompt)
    out, parts = [], []
    for s in range(0, len(images), batch):
        x0 = to_tensor(images[s:s + batch])
        parts.append([])
        out.append(pipe.invert(pipe.backend.vae_encode(x0), hidden, invert_with, steps, trajectory=parts[-1]))
    if trajectory is not None:
        trajectory += [torch.cat(level) for level in zip(*parts)]
    return torch.cat(out)


def from_latents(pipe: Pipeline, x_T: torch.Tensor, prompt: str, cfg: IreceConfig | None, seed: int = 0,
                 steps: int = 25, guidance: float = 5.0, batch: int = 64, trajectory: list | None = None):
    """Regenerate inverted latents with a prompt ('' = the null prompt) on the erased model (`trajectory`: their
    inversion's, from invert_images)."""
    cond, uncond = pipe.encode_prompt(prompt), pipe.encode_prompt("")
    images, masks = [], []
    for s in range(0, len(x_T), batch):
        part = [level[s:s + batch] for level in trajectory] if trajectory is not None else None
        x, rep = pipe.denoise(x_T[s:s + batch], cond, uncond, guidance, steps, cfg, seed + s, trajectory=part)
        images.append(decode(pipe, x, rep, part if cfg is not None and cfg.keep_outside else None))
        masks.append(rep.mask if rep is not None else None)
    return np.concatenate(images), (torch.cat(masks).cpu().numpy() if masks[0] is not None else None)
