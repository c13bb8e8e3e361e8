"""One denoising loop for text-prompt, learned-embedding and inverted-latent requests, with IRECE at t*.

The loop talks to an `Engines` backend only (torch, ONNX Runtime, TensorRT), and uses diffusers' DDIM
schedulers for the arithmetic, so it reproduces StableDiffusionPipeline step for step when IRECE is off.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from transformers import CLIPTokenizer

from . import irece
from .engines import Engines

MODALITIES = ("text", "embedding", "inverted_latent")
StepCallback = Callable[[str, int, int], None]


@dataclass
class Request:
    """One generation. The modality follows from what is set: init_image/init_latent -> inverted_latent,
    learned -> embedding, else text."""
    prompt: str = ""
    negative_prompt: str = ""
    learned: dict[str, torch.Tensor] | None = None  # placeholder string -> (n_vectors, D)
    init_image: np.ndarray | None = None  # uint8 (H, W, 3), to be inverted
    init_latent: torch.Tensor | None = None  # scaled latent (C, h, w), to be inverted
    invert_with: str = "erased"  # white-box: the erased UNet; black-box: the standard one
    inversion_prompt: str = ""
    steps: int = 25
    guidance: float = 5.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    batch: int = 1

    @property
    def modality(self) -> str:
        if self.init_image is not None or self.init_latent is not None:
            return "inverted_latent"
        return "embedding" if self.learned else "text"


@dataclass
class Result:
    images: np.ndarray  # float (B, H, W, 3) in [0, 1]
    irece: irece.IreceReport | None
    timings: dict = field(default_factory=dict)  # stage -> seconds
    latents: torch.Tensor | None = None

    def uint8(self) -> np.ndarray:
        return (self.images * 255).round().astype(np.uint8)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0


class Pipeline:
    def __init__(self, engines: Engines, tokenizer: CLIPTokenizer, scheduler_config: dict, sample_size: int):
        self.engines = engines
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.sample_size = sample_size  # default latent side
        self._loc_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_model_dir(cls, engines: Engines, model_dir: str | Path) -> "Pipeline":
        model_dir = Path(model_dir)
        import json
        unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text())
        return cls(engines, CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
                   DDIMScheduler.load_config(model_dir / "scheduler"), unet_cfg["sample_size"])

    # -- text ------------------------------------------------------------------------------------------------
    def token_ids(self, prompt: str, placeholders: dict[str, int] | None = None) -> tuple[list[int], list[tuple[int, str, int]]]:
        """Tokenize with placeholder strings kept whole: returns ids (BOS..EOS, unpadded) and, for every
        placeholder vector, (position, placeholder, vector index)."""
        tok = self.tokenizer
        ids, slots = [tok.bos_token_id], []
        parts = [prompt]
        for ph in sorted(placeholders or {}, key=len, reverse=True):
            parts = [q for p in parts for q in _split_keep(p, ph)]
        for part in parts:
            if placeholders and part in placeholders:
                for k in range(placeholders[part]):
                    slots.append((len(ids), part, k))
                    ids.append(tok.eos_token_id)  # a stand-in id; its embedding is overwritten
            elif part.strip():
                ids += tok(part, add_special_tokens=False).input_ids
        max_len = tok.model_max_length
        ids = ids[: max_len - 1] + [tok.eos_token_id]
        if any(pos >= max_len - 1 for pos, _, _ in slots):
            raise ValueError("prompt too long: a placeholder token falls past the 77-token limit")
        return ids, slots

    def encode_prompt(self, prompt: str, learned: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Prompt (with optional learned vectors for its placeholders) -> (1, 77, D) hidden states."""
        counts = {k: int(v.shape[0]) for k, v in (learned or {}).items()}
        ids, slots = self.token_ids(prompt, counts)
        if learned and not slots:
            raise ValueError(f"prompt {prompt!r} contains none of the placeholders {sorted(learned)}")
        max_len = self.tokenizer.model_max_length
        padded = torch.tensor([ids + [self.tokenizer.pad_token_id] * (max_len - len(ids))])
        embeds = self.engines.embed_tokens(padded).clone()
        for pos, ph, k in slots:
            vec = learned[ph][k]
            if vec.shape[-1] != embeds.shape[-1]:
                raise ValueError(f"embedding for {ph!r} has width {vec.shape[-1]}, the text encoder expects "
                                 f"{embeds.shape[-1]}")
            embeds[0, pos] = vec.to(embeds.dtype)
        return self.engines.encode_text(embeds)

    def localization(self, concept: str, template: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the localization prompt and the token weights of the concept in it (cached)."""
        key = (concept, template)
        if key not in self._loc_cache:
            prompt = template.format(concept=concept)
            ids, _ = self.token_ids(prompt)
            concept_ids = self.tokenizer(concept, add_special_tokens=False).input_ids
            w = irece.token_weights(ids, concept_ids, self.tokenizer.model_max_length)
            self._loc_cache[key] = (self.encode_prompt(prompt), w[None])
        return self._loc_cache[key]

    # -- schedules -------------------------------------------------------------------------------------------
    def scheduler(self, steps: int) -> DDIMScheduler:
        s = DDIMScheduler.from_config(self.scheduler_config)
        s.set_timesteps(steps)
        return s

    def invert(self, latent: torch.Tensor, hidden: torch.Tensor, model: str, steps: int,
               callback: StepCallback | None = None) -> torch.Tensor:
        """Deterministic DDIM inversion x_0 -> x_T along the same timesteps the sampler then walks back."""
        inv = DDIMInverseScheduler.from_config(self.scheduler_config)
        inv.set_timesteps(steps)
        x = latent.to(self.engines.device)
        for i, t in enumerate(inv.timesteps):
            if callback:
                callback("inversion", i, steps)
            x = inv.step(self.engines.eps(model, x, t, hidden.expand(x.shape[0], -1, -1)), t, x).prev_sample
        return x

    # -- IRECE -----------------------------------------------------------------------------------------------
    def localize(self, x: torch.Tensor, t: torch.Tensor, cfg: irece.IreceConfig,
                 targets: list[tuple[str, float]]) -> tuple[torch.Tensor, list]:
        """Union mask (B, h, w) over the (concept, tau) targets and per-concept reports, from the standard UNet."""
        b = x.shape[0]
        concepts = [c for c, _ in targets]
        hidden, weights = zip(*(self.localization(c, cfg.template) for c in concepts))
        n = len(concepts)
        maps = self.engines.concept_map(x.repeat(n, 1, 1, 1), t, torch.cat(hidden).repeat_interleave(b, 0),
                                        torch.cat(weights).repeat_interleave(b, 0))
        maps = maps.view(n, b, *maps.shape[1:])
        masks = torch.stack([irece.concept_mask(maps[i], tau, cfg.min_peak) for i, (_, tau) in enumerate(targets)])
        peaks = maps.flatten(2).max(2).values
        reports = [irece.ConceptReport(c, float(masks[i].mean()), float(peaks[i].max()), bool(masks[i].any()))
                   for i, c in enumerate(concepts)]
        return masks.amax(0), reports

    # -- the loop --------------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
                steps: int, cfg: irece.IreceConfig | None = None, seed: int = 0,
                timings: dict | None = None, callback: StepCallback | None = None
                ) -> tuple[torch.Tensor, irece.IreceReport | None]:
        """DDIM with classifier-free guidance on the erased UNet; IRECE perturbs x once, at step t*."""
        sched = self.scheduler(steps)
        x = x.to(self.engines.device)
        b = x.shape[0]
        # a null prompt on both branches makes guidance a no-op: one UNet pass per step instead of two
        guided = uncond is not None and guidance != 1.0 and not torch.equal(cond, uncond)
        hidden = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)]) if guided else cond.expand(b, -1, -1)
        report = None
        plan = cfg.plan(steps) if cfg and cfg.concepts else {}
        timings = timings if timings is not None else {}
        t0 = time.perf_counter()
        for i, t in enumerate(sched.timesteps):
            if callback:
                callback("denoising", i, steps)
            if i in plan:
                tl = time.perf_counter()
                mask, concepts = self.localize(x, t, cfg, plan[i])
                xi = torch.randn(x.shape, generator=torch.Generator().manual_seed((seed + 1_000_003 + i) % 2**63)).to(x)
                x = irece.perturb(x, mask.to(x), xi, cfg.mode)
                if report is None:
                    report = irece.IreceReport(i, int(t), concepts, mask)
                else:  # tuned per-concept t*: several intervention steps, one report
                    report.concepts += concepts
                    report.mask = torch.maximum(report.mask, mask)
                timings["localization"] = timings.get("localization", 0.0) + time.perf_counter() - tl
            if guided:
                e_u, e_c = self.engines.eps("erased", torch.cat([x, x]), t, hidden).chunk(2)
                e = e_u + guidance * (e_c - e_u)
            else:
                e = self.engines.eps("erased", x, t, hidden)
            x = sched.step(e, t, x).prev_sample
        timings["denoising"] = time.perf_counter() - t0 - timings.get("localization", 0.0)
        return x, report

    def generate(self, req: Request, cfg: irece.IreceConfig | None = None,
                 callback: StepCallback | None = None) -> Result:
        """callback(stage, step, total) runs before every engine step; raising from it aborts the request."""
        timings: dict = {}
        t0 = time.perf_counter()
        cond = self.encode_prompt(req.prompt, req.learned)
        uncond = self.encode_prompt(req.negative_prompt)
        timings["text_encoding"] = time.perf_counter() - t0
        e = self.engines
        if req.modality == "inverted_latent":
            t1 = time.perf_counter()
            if req.init_latent is not None:
                latent = req.init_latent[None] if req.init_latent.ndim == 3 else req.init_latent
            else:
                latent = e.vae_encode(image_to_tensor(req.init_image))
            inv_hidden = self.encode_prompt(req.inversion_prompt)
            x = self.invert(latent.repeat(req.batch, 1, 1, 1), inv_hidden, req.invert_with, req.steps, callback)
            timings["inversion"] = time.perf_counter() - t1
        else:
            h = (req.height or self.sample_size * e.vae_scale_factor) // e.vae_scale_factor
            w = (req.width or self.sample_size * e.vae_scale_factor) // e.vae_scale_factor
            gen = torch.Generator().manual_seed(req.seed)
            x = torch.randn((req.batch, e.latent_channels, h, w), generator=gen)
        x, report = self.denoise(x, cond, uncond, req.guidance, req.steps, cfg, req.seed, timings, callback)
        t2 = time.perf_counter()
        images = (e.vae_decode(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        timings["decoding"] = time.perf_counter() - t2
        return Result(images, report, timings, x)


def _split_keep(text: str, sep: str) -> list[str]:
    pieces = text.split(sep)
    out = []
    for i, p in enumerate(pieces):
        if p:
            out.append(p)
        if i < len(pieces) - 1:
            out.append(sep)
    return out

