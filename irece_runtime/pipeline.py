"""One denoising loop for text-prompt, learned-embedding and inverted-latent requests, with IRECE at t*.

The loop talks to a backend only (torch, ONNX Runtime, TensorRT), and uses diffusers' DDIM schedulers for the
arithmetic, so it reproduces StableDiffusionPipeline step for step when IRECE is off.

A request is a state machine (`Pipeline.machine`): a generator that yields engine calls (`calls.Call`: text
encoder, VAE, UNet noise prediction, localizer) and receives their results. `generate` drives one machine alone;
the batched server drives many and merges their calls of one kind into one backend call (`server/scheduler.py`).
Every step below is written once, as a generator (`yield from`); the plain methods (`encode_prompt`, `invert`,
`localize`, `denoise`, `generate`) are those generators driven alone.
"""
from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from transformers import CLIPTokenizer

from . import gates, irece
from .images import to_tensor, to_uint8, to_unit
from .backends import Backend
from .calls import Call, Machine, drive
from .concept_head import HEAD_CONFIG, HEAD_DIR
from .stages import Conditioning, Defence, EpsSteps, keep_pixels, needs_trajectory

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
        return to_uint8(self.images)


DEFAULT_VOCABULARY = Path(__file__).with_name("vocabulary.json")


def model_vocabulary(model_dir: str | Path) -> tuple[str, ...]:
    """The concepts the classifier gate weighs a target against: the folder's concepts.json (a list of names) where
    it has one - an operator replaces the vocabulary by writing it - else the shipped default for SD-style models
    (common subjects and styles, irece_runtime/vocabulary.json). Never empty: a softmax over the target alone
    scores 1.0 for every image."""
    own = Path(model_dir) / "concepts.json"
    return tuple(json.loads((own if own.exists() else DEFAULT_VOCABULARY).read_text()))


class Pipeline:
    def __init__(self, backend: Backend, tokenizer: CLIPTokenizer, scheduler_config: dict, sample_size: int,
                 vocabulary: tuple[str, ...] = (), head_concepts: tuple[str, ...] = (), head_trained_at: tuple = ()):
        self.backend = backend
        self.head_concepts: tuple[str, ...] = tuple(head_concepts)  # the concept head's outputs (gate "head")
        self.head_trained_at = tuple(head_trained_at)  # the schedule points its training saw (fractions)
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.sample_size = sample_size  # default latent side
        self.vocabulary: tuple[str, ...] = tuple(vocabulary)  # the model's concepts (contrastive localization)
        # localization prompts' hidden states and token weights, and the classifier gate's prompts
        self._loc_cache: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_model_dir(cls, backend: Backend, model_dir: str | Path) -> "Pipeline":
        """The model's concept vocabulary (model_vocabulary) and concept head come from the folder."""
        model_dir = Path(model_dir)
        unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text())
        head = model_dir / HEAD_DIR / HEAD_CONFIG
        head_cfg = json.loads(head.read_text()) if head.exists() else {}
        return cls(backend, CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
                   DDIMScheduler.load_config(model_dir / "scheduler"), unet_cfg["sample_size"],
                   model_vocabulary(model_dir), tuple(head_cfg.get("concepts", ())),
                   tuple(head_cfg.get("trained_at", ())))

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
        return drive(self.encode_prompt_steps(prompt, learned), self.backend)

    def encode_prompt_steps(self, prompt: str, learned: dict[str, torch.Tensor] | None = None) -> Machine:
        """`encode_prompt` as a machine: one text-encoder call."""
        counts = {k: int(v.shape[0]) for k, v in (learned or {}).items()}
        ids, slots = self.token_ids(prompt, counts)
        if learned and not slots:
            raise ValueError("the prompt contains none of the placeholders of its learned embeddings")
        max_len = self.tokenizer.model_max_length
        padded = torch.tensor([ids + [self.tokenizer.pad_token_id] * (max_len - len(ids))])
        embeds = self.backend.embed_tokens(padded).clone()
        for pos, ph, k in slots:
            vec = learned[ph][k]
            if vec.shape[-1] != embeds.shape[-1]:
                raise ValueError(f"embedding for {ph!r} has width {vec.shape[-1]}, the text encoder expects "
                                 f"{embeds.shape[-1]}")
            embeds[0, pos] = vec.to(embeds.dtype)
        return (yield Call("encode_text", (embeds,)))

    def localization(self, concept: str, template: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the localization prompt and the token weights of the concept in it (cached)."""
        def make():
            prompt = template.format(concept=concept)
            ids, _ = self.token_ids(prompt)
            concept_ids = self.tokenizer(concept, add_special_tokens=False).input_ids
            w = irece.token_weights(ids, concept_ids, self.tokenizer.model_max_length)
            return self.encode_prompt(prompt), w[None]
        return self.memo((concept, template), make)

    # -- schedules -------------------------------------------------------------------------------------------
    def scheduler(self, steps: int, inverse: bool = False) -> DDIMScheduler | DDIMInverseScheduler:
        """DDIM (or its inverse) on the model's noise schedule: the only sampler the loop is validated against."""
        s = (DDIMInverseScheduler if inverse else DDIMScheduler).from_config(self.scheduler_config)
        s.set_timesteps(steps)
        return s

    def invert(self, latent: torch.Tensor, hidden: torch.Tensor, model: str, steps: int,
               callback: StepCallback | None = None, trajectory: list | None = None) -> torch.Tensor:
        """Deterministic DDIM inversion x_0 -> x_T along the same timesteps the sampler then walks back."""
        return drive(self.invert_steps(latent, hidden, model, steps, callback, trajectory), self.backend)

    def invert_steps(self, latent, hidden, model, steps, callback=None, trajectory: list | None = None) -> Machine:
        """With a `trajectory` list: it receives the latent at every level the inversion passes, from the input
        up to x_T (steps + 1 latents), which is where the sampler then passes on its way back."""
        eps = guided_eps(model, hidden, None, 1.0)
        record = () if trajectory is None else (lambda i, t, x: trajectory.append(x) or x,)
        x = yield from sample(eps, latent.to(self.backend.device), self.scheduler(steps, inverse=True), record,
                              callback, "inversion")
        if trajectory is not None:
            trajectory.append(x)
        return x

    # -- IRECE's looks (irece_runtime/gates.py) over this model's prompts ---------------------------------------
    def memo(self, key, make):
        """make()'s result, computed once per key (the looks' prompts' hidden states)."""
        if key not in self._loc_cache:
            self._loc_cache[key] = make()
        return self._loc_cache[key]

    def localize(self, x: torch.Tensor, t: torch.Tensor, cfg: irece.IreceConfig,
                 targets: list[tuple[str, float, float]], conditioning: "Conditioning | None" = None
                 ) -> tuple[torch.Tensor, list]:
        """Union mask (B, h, w) over the (concept, tau, threshold) targets and per-concept reports under cfg's gate
        (gates.look), from the standard UNet."""
        cond = conditioning.cond if conditioning is not None and gates.reads_conditioning(cfg) else None
        found = drive(gates.look(self, x, t, cfg, targets, cond), self.backend)
        return found.mask, found.concepts

    def presence_steps(self, x, t, cfg: irece.IreceConfig, cond: torch.Tensor | None = None,
                       decided: Callable | None = None) -> Machine:
        """The classifier gate's scores (gates.presence_steps) as a machine."""
        return gates.presence_steps(self, x, t, cfg, cond, decided)

    def presence(self, x: torch.Tensor, t: torch.Tensor, cfg: irece.IreceConfig) -> torch.Tensor:
        """(B, K) presence scores of the contrast set at x_t under cfg's gate (benchmarks, calibration)."""
        if cfg.gate == "classifier":
            return drive(self.presence_steps(x, t, cfg), self.backend)[0]
        if cfg.gate == "head":
            columns = self.head_columns(self.contrast_set(cfg))
            return irece.head_scores(drive(self.head_steps(x, t), self.backend))[:, columns]
        raise ValueError(f"gate {cfg.gate!r} gives no presence score (the paper's IRECE always intervenes)")

    def head_columns(self, concepts) -> list[int]:
        return gates.head_columns(self, concepts)

    def head_steps(self, x, t) -> Machine:
        return gates.head_steps(self, x, t)

    def contrast_set(self, cfg: irece.IreceConfig) -> tuple[str, ...]:
        return gates.contrast_set(self, cfg)

    @cached_property
    def null_hidden(self) -> torch.Tensor:
        """(1, 77, D) hidden states of the empty prompt."""
        return self.encode_prompt("")

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """The noise schedule's cumulative alphas (the same for every number of sampling steps)."""
        return DDIMScheduler.from_config(self.scheduler_config).alphas_cumprod

    # -- the loop --------------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
                steps: int, cfg: irece.IreceConfig | None = None, seed: int = 0,
                timings: dict | None = None, callback: StepCallback | None = None,
                scheduler: DDIMScheduler | None = None, trajectory: list | None = None, learned: bool = False
                ) -> tuple[torch.Tensor, irece.IreceReport | None]:
        """DDIM with classifier-free guidance on the erased UNet; IRECE perturbs x at step t*. `trajectory`: an
        inverted latent's inversion trajectory (invert_steps), for cfg.keep_outside; `learned`: cond holds learned
        embedding vectors (the conditioning stage treats them as the attacker's)."""
        return drive(self.denoise_steps(x, cond, uncond, guidance, steps, cfg, seed, timings, callback, scheduler,
                                        trajectory, learned), self.backend)

    def denoise_steps(self, x, cond, uncond, guidance, steps, cfg=None, seed=0, timings=None, callback=None,
                      scheduler=None, trajectory=None, learned=False) -> Machine:
        """`denoise` as a machine: a UNet call per step (both guidance branches in one), the localizer at t*."""
        scheduler = scheduler or self.scheduler(steps)
        # with conditioning "null", an image whose conditioning IRECE drops continues on uncond (else the empty prompt)
        dropping = cfg is not None and cfg.conditioning == "null"
        conditioning = Conditioning(cond, uncond if uncond is not None or not dropping else self.null_hidden, learned)
        defence = Defence(self, cfg, len(scheduler.timesteps), seed, conditioning,
                          trajectory if needs_trajectory(cfg) else None) if cfg and cfg.concepts else None
        t0 = time.perf_counter()
        eps = guided_eps("erased", conditioning, uncond, guidance)
        x = yield from sample(defence.wrap_eps(eps) if defence else eps, x.to(self.backend.device), scheduler,
                              (defence,) if defence else (), callback)
        if defence:
            x = defence.after_loop(x)
        if defence and not torch.isfinite(x).all():  # e.g. a full mask cannot help a non-finite conditioning
            raise irece.NonFiniteError("the denoised latent is not finite: no image IRECE cannot vouch for")
        timings = timings if timings is not None else {}
        if defence:
            timings["localization"] = defence.state.seconds
        timings["denoising"] = time.perf_counter() - t0 - timings.get("localization", 0.0)
        return x, defence.report if defence else None

    def generate(self, req: Request, cfg: irece.IreceConfig | None = None,
                 callback: StepCallback | None = None) -> Result:
        """callback(stage, step, total) runs before every engine step; raising from it aborts the request."""
        return drive(self.machine(req, cfg, callback), self.backend)

    def machine(self, req: Request, cfg: irece.IreceConfig | None = None,
                callback: StepCallback | None = None) -> Machine:
        """The request as a state machine: encode -> (inversion steps) -> denoising steps with IRECE at its t* ->
        decode. Yields `Call`s, receives their results, returns the `Result`; the callback runs before every step,
        in whichever thread drives the machine, and raising from it ends the request."""
        timings: dict = {}
        t0 = time.perf_counter()
        cond = yield from self.encode_prompt_steps(req.prompt, req.learned)
        uncond = yield from self.encode_prompt_steps(req.negative_prompt)
        timings["text_encoding"] = time.perf_counter() - t0
        e = self.backend
        if req.modality == "inverted_latent":
            t1 = time.perf_counter()
            if req.init_latent is not None:
                latent = req.init_latent[None] if req.init_latent.ndim == 3 else req.init_latent
            else:
                latent = yield Call("vae_encode", (to_tensor(req.init_image),))
            e.limits.check(req.batch, *latent.shape[-2:])
            inv_hidden = yield from self.encode_prompt_steps(req.inversion_prompt)
            trajectory = [] if needs_trajectory(cfg) else None
            x = yield from self.invert_steps(latent.repeat(req.batch, 1, 1, 1), inv_hidden, req.invert_with,
                                             req.steps, callback, trajectory)
            timings["inversion"] = time.perf_counter() - t1
        else:
            trajectory = None
            h = (req.height or self.sample_size * e.vae_scale_factor) // e.vae_scale_factor
            w = (req.width or self.sample_size * e.vae_scale_factor) // e.vae_scale_factor
            e.limits.check(req.batch, h, w)
            gen = torch.Generator().manual_seed(req.seed)
            x = torch.randn((req.batch, e.latent_channels, h, w), generator=gen)
        x, report = yield from self.denoise_steps(x, cond, uncond, req.guidance, req.steps, cfg, req.seed, timings,
                                                  callback, trajectory=trajectory, learned=bool(req.learned))
        t2 = time.perf_counter()
        images = yield from self.decode_steps(x, report, trajectory)
        timings["decoding"] = time.perf_counter() - t2
        return Result(images, report, timings, x)

    def decode(self, x: torch.Tensor, report: irece.IreceReport | None = None,
               trajectory: list | None = None) -> torch.Tensor:
        """Latents -> float (B, H, W, 3) images in [0, 1]; with keep_outside's `trajectory` and IRECE's report, the
        pixels outside its mask are the input latent's (irece.keep_pixels_outside), and with keep_others those inside
        it where the head saw another concept beat the targets (the report's contest)."""
        return drive(self.decode_steps(x, report, trajectory), self.backend)

    def decode_steps(self, x, report=None, trajectory=None) -> Machine:
        decoded = yield Call("vae_decode", (x,))
        return to_unit((yield from keep_pixels(decoded, report, trajectory)))


# -- the recipe's parts: a sampler over a noise-prediction machine, guidance as a wrapper, IRECE as a hook -----
# (step index, t, x_t) -> x_t, or a machine returning it (a hook that needs engine calls: IRECE's localizer)
StepHook = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | Machine"]


def sample(eps: EpsSteps, x: torch.Tensor, scheduler, hooks: tuple[StepHook, ...] = (),
           callback: StepCallback | None = None, stage: str = "denoising") -> Machine:
    """The one loop: every step, callback (may raise to abort), hooks may rewrite x_t, then one scheduler step.
    A machine: `calls.drive(sample(...), backend)` runs it alone."""
    n = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if callback:
            callback(stage, i, n)
        for hook in hooks:
            x = hook(i, t, x)
            if inspect.isgenerator(x):
                x = yield from x
        x = scheduler.step((yield from eps(x, t)), t, x).prev_sample
    return x


def guided_eps(model: str, cond: "torch.Tensor | Conditioning", uncond: torch.Tensor | None,
               guidance: float) -> EpsSteps:
    """Classifier-free guidance as a noise-prediction wrapper: eps_u + w (eps_c - eps_u), one UNet call for both
    branches (the guidance pair stays together when calls are batched). A null prompt on both branches (or w = 1)
    makes guidance a no-op: one UNet pass per step instead of two. cond may be a Conditioning, read at every step."""
    state = cond if isinstance(cond, Conditioning) else Conditioning(cond, cond)
    if uncond is None or guidance == 1.0 or torch.equal(state.cond, uncond):
        # (dropping a conditioning equal to uncond changes nothing, so this stays one pass per step)
        def plain(x, t):
            return (yield Call("eps", (x, state.cond.expand(x.shape[0], -1, -1)), t, model))
        return plain

    pairs: dict[int, tuple] = {}  # batch size -> (cond, [uncond; cond]): built once per request and conditioning

    def eps(x, t):
        b = x.shape[0]
        if b not in pairs or pairs[b][0] is not state.cond:
            pairs[b] = (state.cond, torch.cat([uncond.expand(b, -1, -1), state.cond.expand(b, -1, -1)]))
        e_u, e_c = (yield Call("eps", (torch.cat([x, x]), pairs[b][1]), t, model)).chunk(2)
        return e_u + guidance * (e_c - e_u)
    return eps


class _Seen(Exception):
    """trajectory: every asked-for step is seen."""


def trajectory(pipe, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance: float, steps: int,
               at, model: str = "standard", backend=None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Run the pipeline's own sampler with `model` from x, without IRECE, and return (i, t, x_t) at each schedule
    index in `at`, stopping after the last. `backend`: pipe.backend, or a differentiable stand-in (adaptive
    attacks). Benchmarks and the concept head's training read x_t where IRECE would."""
    at, seen = set(at), []

    def capture(i, t, x_t):
        if i in at:
            seen.append((i, t, x_t))
            if i == max(at):
                raise _Seen
        return x_t
    try:
        drive(sample(guided_eps(model, cond, uncond, guidance), x, pipe.scheduler(steps), (capture,)),
              backend or pipe.backend)
    except _Seen:
        pass
    return seen


def _split_keep(text: str, sep: str) -> list[str]:
    pieces = text.split(sep)
    out = []
    for i, p in enumerate(pieces):
        if p:
            out.append(p)
        if i < len(pieces) - 1:
            out.append(sep)
    return out

