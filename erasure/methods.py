"""Concept erasure methods, for the benchmark and for users without checkpoints: UCE, ESD-x, ESD-u, Receler.

Formulas and defaults follow the reference code (../shared/reference/paper-and-erasure-methods.md §5);
step counts and learning rates are scaled to the model at hand (see ERASE_DEFAULTS). Each method writes a
diffusers UNet folder that `--erased` accepts (Receler adds its erasers beside the weights).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from tqdm import tqdm

from irece_runtime.backends.torch_backend import TorchBackend
from irece_runtime.erasers import ERASERS_FILE, install_erasers
from irece_runtime.irece import concept_mask, token_weights
from irece_runtime.pipeline import Pipeline

METHODS = ("uce", "esd-x", "esd-u", "receler")
# Iterations and learning rates: the references' values are for SD v1.4 (860 M parameters, 512 px);
# ours are measured on Shapes-10 (see BENCHMARKS.md) and overridable with --steps.
ERASE_DEFAULTS = {
    "esd-x": dict(steps=300, lr=2e-4, negative_guidance=1.0, start_guidance=3.0, batch=4),
    "esd-u": dict(steps=300, lr=1e-4, negative_guidance=1.0, start_guidance=3.0, batch=4),
    "receler": dict(steps=300, lr=1e-3, negative_guidance=1.0, start_guidance=3.0, batch=4, rank=16,
                    reg_weight=0.1, mask_thres=0.1),
}
GENERIC_TEMPLATES = ("{concept}", "a {concept}", "an image of a {concept}", "a photo of a {concept}",
                     "a picture of a {concept}", "a painting of a {concept}", "a drawing of a {concept}",
                     "a close-up of a {concept}")
PromptSet = Callable[[str, int, int], list[str]]  # (concept, n, seed) -> prompts that name the concept


def generic_prompts(concept: str, n: int = 24, seed: int = 0) -> list[str]:
    """Varied phrasings of any concept (the erasure must hold across phrasings, not one string). Worlds with
    attributes of their own pass a richer set (miniworld.prompts.erase_prompts for Shapes-10)."""
    return [GENERIC_TEMPLATES[(seed + i) % len(GENERIC_TEMPLATES)].format(concept=concept) for i in range(n)]


# -- UCE ------------------------------------------------------------------------------------------------------
def _concept_rows(pipe: Pipeline, prompt: str, concept: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder rows from the concept's first token to the end (EOS and padding: the causal encoder carries
    the concept into every later position, and cross-attention reads all 77), and the aligned rows of the same
    prompt with the concept removed (the guide: the empty concept), as UCE's original script does."""
    ids, _ = pipe.token_ids(prompt)
    cids = pipe.tokenizer(concept, add_special_tokens=False).input_ids
    pos = next(i for i in range(len(ids)) if ids[i:i + len(cids)] == cids)
    hidden = pipe.encode_prompt(prompt)[0]
    guide = pipe.encode_prompt(" ".join(prompt.replace(concept, " ").split()))[0]
    erase_rows = hidden[pos:]
    guide_idx = [max(pos - 1, 0)] * len(cids) + list(range(pos, hidden.shape[0] - len(cids)))
    return erase_rows, guide[guide_idx]


@torch.no_grad()
def uce(unet: UNet2DConditionModel, pipe: Pipeline, concept: str, preserve: list[str], lamb: float = 0.5,
        erase_scale: float = 1.0, preserve_scale: float | None = None,
        prompts: PromptSet = generic_prompts) -> UNet2DConditionModel:
    """Closed-form edit of every cross-attention to_k/to_v: W = (lamb W + sum_e v*_e c_e^T + sum_p W c_p c_p^T)
    (lamb I + sum_e c_e c_e^T + sum_p c_p c_p^T)^-1 with v*_e = W c_guide."""
    erase_c, guide_c = zip(*(_concept_rows(pipe, p, concept) for p in prompts(concept, 24, 0)))
    erase_c, guide_c = torch.cat(erase_c), torch.cat(guide_c)
    keep = [pipe.encode_prompt(p)[0] for q in preserve for p in prompts(q, 8, 0)] + [pipe.encode_prompt("")[0]]
    keep_c = torch.cat(keep)
    preserve_scale = preserve_scale if preserve_scale is not None else max(0.1, 1.0 / max(1, len(preserve)))
    for name, module in unet.named_modules():
        if not name.endswith("attn2"):
            continue
        for proj in (module.to_k, module.to_v):
            W = proj.weight  # (out, d)
            d = W.shape[1]
            mat1 = lamb * W + erase_scale * (W @ guide_c.T) @ erase_c + preserve_scale * (W @ keep_c.T) @ keep_c
            mat2 = lamb * torch.eye(d) + erase_scale * erase_c.T @ erase_c + preserve_scale * keep_c.T @ keep_c
            proj.weight.copy_(mat1 @ torch.linalg.inv(mat2))
    return unet


# -- ESD and Receler: negative-guidance distillation ---------------------------------------------------------
def _trainable(unet, method: str):
    if method == "esd-x":
        return [p for n, p in unet.named_parameters() if ".attn2." in n]
    if method == "esd-u":
        return [p for n, p in unet.named_parameters() if ".attn2." not in n]
    if method == "receler":
        return list(unet.receler_erasers.parameters())
    raise ValueError(method)


@torch.no_grad()
def _sample_to(pipe: Pipeline, base, cond, uncond, guidance, t_index, n_steps, x):
    """Run the base model's DDIM sampler from noise x down to schedule index t_index; returns (x_t, t)."""
    sched = pipe.scheduler(n_steps)
    for t in sched.timesteps[:t_index]:
        e_u, e_c = base(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return x, sched.timesteps[t_index]


def esd(unet, base, pipe: Pipeline, concept: str, method: str, steps: int, lr: float, negative_guidance: float,
        start_guidance: float, batch: int, seed: int = 0, rank: int = 16, reg_weight: float = 0.1,
        mask_thres: float = 0.1, n_steps: int = 25, prompts: PromptSet = generic_prompts):
    """ESD: train eps_erased(x_t, c, t) -> eps(x_t, t) - eta (eps(x_t, c, t) - eps(x_t, t)) on the base model's
    own samples x_t. Receler: the same objective on erasers only, plus the mask-localized regularizer."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    state = install_erasers(unet, rank=rank) if method == "receler" else None
    for p in unet.parameters():
        p.requires_grad_(False)
    params = _trainable(unet, method)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    texts = prompts(concept, 64, seed)
    hidden = torch.cat([pipe.encode_prompt(p) for p in texts])
    cids = pipe.tokenizer(concept, add_special_tokens=False).input_ids
    weights = torch.stack([token_weights(pipe.token_ids(p)[0], cids) for p in texts])  # Receler's mask
    uncond = pipe.encode_prompt("")
    e = pipe.backend
    side = pipe.sample_size
    unet.train()
    for _ in (bar := tqdm(range(steps), desc=f"erase {method} {concept}", mininterval=5)):
        pick = torch.randint(len(texts), (batch,), generator=g)
        cond = hidden[pick]
        t_index = int(torch.randint(1, n_steps, (1,), generator=g))
        x0 = torch.randn((batch, e.latent_channels, side, side), generator=g)
        x_t, t = _sample_to(pipe, base, cond, uncond.expand(batch, -1, -1), start_guidance, t_index, n_steps, x0)
        with torch.no_grad():
            e_0 = base(x_t, t, uncond.expand(batch, -1, -1)).sample
            e_p = base(x_t, t, cond).sample
            target = e_0 - negative_guidance * (e_p - e_0)
            if state is not None:
                state["mask"] = concept_mask(e.concept_map(x_t, t, cond, weights[pick]), mask_thres)
                state["reg"] = []
        loss = F.mse_loss(unet(x_t, t, cond).sample, target)
        if state is not None:
            loss = loss + reg_weight * torch.stack(state["reg"]).mean()
            state["reg"], state["mask"] = [], None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet


# -- entry point -----------------------------------------------------------------------------------------------
def save_erased(unet, out: str | Path, info: dict) -> None:
    out = Path(out)
    erasers = getattr(unet, "receler_erasers", None)
    if erasers is not None:
        del unet.receler_erasers  # the UNet folder keeps the base weights only; erasers go beside them
    unet.save_pretrained(out, safe_serialization=True)
    if erasers is not None:
        save_file({k: v.contiguous() for k, v in erasers.state_dict().items()}, str(out / ERASERS_FILE))
        (out / ERASERS_FILE).with_suffix(".json").write_text(json.dumps({"rank": info.get("rank", 16)}))
        unet.receler_erasers = erasers
    (out / "erasure.json").write_text(json.dumps(info, indent=2))


def erase(method: str, model_dir: str | Path, concept: str, out: str | Path, preserve: list[str] | None = None,
          steps: int | None = None, seed: int = 0, prompts: PromptSet = generic_prompts) -> dict:
    """Erase `concept` from the model folder's UNet with `method`, training on `prompts` (phrasings of a concept);
    UCE also preserves `preserve` (default: the other concepts of the folder's concepts.json, if any)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    t0 = time.time()
    backend = TorchBackend(model_dir)
    pipe = Pipeline.from_model_dir(backend, model_dir)
    if concept not in pipe.tokenizer.get_vocab() and not pipe.tokenizer(concept, add_special_tokens=False).input_ids:
        raise ValueError(f"concept {concept!r} does not tokenize")
    base = backend.unets["standard"]
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    info: dict = {"method": method, "concept": concept, "seed": seed}
    if method == "uce":
        preserve = preserve if preserve is not None else [c for c in pipe.vocabulary if c != concept]
        uce(unet, pipe, concept, preserve, prompts=prompts)
        info["preserve"] = preserve
    else:
        hp = dict(ERASE_DEFAULTS[method])
        if steps:
            hp["steps"] = steps
        esd(unet, base, pipe, concept, method, seed=seed, prompts=prompts, **hp)
        info.update(hp)
    save_erased(unet, out, info)
    info["seconds"] = round(time.time() - t0, 1)
    info["out"] = str(out)
    return info
