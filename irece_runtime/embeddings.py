"""Learned embeddings (textual inversion) as diffusers and A1111 write them, and raw arrays.

Returns {placeholder: (n_vectors, D) float tensor}. Never unpickles: .bin/.pt go through
torch.load(weights_only=True), .npy through numpy with allow_pickle=False.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _as_vectors(t: torch.Tensor, where: str) -> torch.Tensor:
    t = torch.as_tensor(t).float()
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[0] < 1:
        raise ValueError(f"{where}: expected a (D,) or (n, D) array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{where}: embedding contains NaN or inf")
    return t


def _from_state(state: dict, path: Path, token: str | None) -> dict[str, torch.Tensor]:
    if "string_to_param" in state:  # A1111 .pt layout
        state = state["string_to_param"]
        key = next(iter(state))
        return {token or f"<{path.stem}>": _as_vectors(state[key], str(path))}
    if "emb_params" in state:  # A1111 .safetensors layout
        return {token or f"<{path.stem}>": _as_vectors(state["emb_params"], str(path))}
    if len(state) == 1 and token:  # diffusers layout, renamed
        return {token: _as_vectors(next(iter(state.values())), str(path))}
    return {k: _as_vectors(v, f"{path}[{k}]") for k, v in state.items()}  # diffusers: {placeholder: vector}


def load_learned_embedding(path: str | Path, token: str | None = None) -> dict[str, torch.Tensor]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _from_state(load_file(str(path)), path, token)
    if suffix in (".bin", ".pt"):
        return _from_state(torch.load(path, map_location="cpu", weights_only=True), path, token)
    if suffix == ".npy":
        return {token or f"<{path.stem}>": _as_vectors(torch.from_numpy(np.load(path, allow_pickle=False)), str(path))}
    raise ValueError(f"{path}: unsupported embedding format (use .safetensors, .bin/.pt or .npy)")


def save_learned_embedding(path: str | Path, learned: dict[str, torch.Tensor]) -> None:
    """diffusers' learned_embeds.safetensors layout."""
    save_file({k: v.detach().float().contiguous() for k, v in learned.items()}, str(path))
