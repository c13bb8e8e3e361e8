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

from . import irece
from .images import to_tensor, to_uint8, to_unit
from .backends import Backend
from .calls import Call, Machine, drive
from .concept_head import HEAD_CONFIG, HEAD_DIR

StepCallback = Callable[[str, int, int], None]
CLASSIFIER_SEED = 20_231_002  # the diffusion-classifier gate's fixed re-noising noise (seed + index of t')


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
        """concepts.json in the folder (a list of names), when present, is the model's concept vocabulary."""
        model_dir = Path(model_dir)
        unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text())
        vocab = model_dir / "concepts.json"
        head = model_dir / HEAD_DIR / HEAD_CONFIG
        head_cfg = json.loads(head.read_text()) if head.exists() else {}
        return cls(backend, CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
                   DDIMScheduler.load_config(model_dir / "scheduler"), unet_cfg["sample_size"],
                   tuple(json.loads(vocab.read_text())) if vocab.exists() else (),
                   tuple(head_cfg.get("concepts", ())), tuple(head_cfg.get("trained_at", ())))

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
        key = (concept, template)
        if key not in self._loc_cache:
            prompt = template.format(concept=concept)
            ids, _ = self.token_ids(prompt)
            concept_ids = self.tokenizer(concept, add_special_tokens=False).input_ids
            w = irece.token_weights(ids, concept_ids, self.tokenizer.model_max_length)
            self._loc_cache[key] = (self.encode_prompt(prompt), w[None])
        return self._loc_cache[key]

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

    # -- IRECE -----------------------------------------------------------------------------------------------
    def localize(self, x: torch.Tensor, t: torch.Tensor, cfg: irece.IreceConfig,
                 targets: list[tuple[str, float, float]], conditioning: "Conditioning | None" = None
                 ) -> tuple[torch.Tensor, list]:
        """Union mask (B, h, w) over the (concept, tau, threshold) targets and per-concept reports, from the
        standard UNet: the paper's per-concept min-max masks (gate "off"), or competing concepts (gate
        "contrastive"), where a concept is masked only in images whose presence score reaches its threshold."""
        return drive(self.localize_steps(x, t, cfg, targets, conditioning), self.backend)

    def localize_steps(self, x, t, cfg: irece.IreceConfig, targets, conditioning=None) -> Machine:
        """`localize` as a machine: one localizer call. With cfg.conditioning "null" and the request's
        `conditioning`, the classifier gate also scores the conditioning and drops it from the images where it
        carries a target (Conditioning.drop). The union mask comes grown by cfg.grow cells (irece.grow_mask)."""
        if not torch.isfinite(x).all():
            return self._fail_closed(x, cfg, targets, "latent")
        if cfg.gate == "head":  # grows its own masks: it knows which cells the other concepts hold
            return (yield from self._localize_head(x, t, cfg, targets))
        mask, reports = yield from self._localize_maps(x, t, cfg, targets, conditioning)
        return irece.grow_mask(mask, cfg.grow), reports

    def _localize_maps(self, x, t, cfg: irece.IreceConfig, targets, conditioning=None) -> Machine:
        """The ungrown union mask and reports of the attention-map gates (off, contrastive, classifier)."""
        if cfg.gate == "contrastive":
            return (yield from self._localize_contrastive(x, t, cfg, targets))
        if cfg.gate == "classifier":
            return (yield from self._localize_classifier(x, t, cfg, targets, conditioning))
        masks, peaks, _ = yield from self._concept_maps(x, t, cfg, targets)
        if masks is None:
            return self._fail_closed(x, cfg, targets, "concept map")
        reports = [irece.ConceptReport(c, float(masks[i].mean()), float(peaks[i].max()), bool(masks[i].any()),
                                       images=irece.masked_images(masks[i]))
                   for i, (c, _, _) in enumerate(targets)]
        return masks.amax(0), reports

    def _concept_maps(self, x, t, cfg: irece.IreceConfig, targets) -> Machine:
        """The paper's masks: each target's own localization prompt, min-max of its map >= its tau. Returns masks
        (n, B, h, w), peaks (n, B) and the raw maps (n, B, h, w), or (None, None, None) where a map is not finite."""
        b = x.shape[0]
        hidden, weights = zip(*(self.localization(c, cfg.template) for c, _, _ in targets))
        n = len(targets)
        maps = yield Call("concept_map", (x.repeat(n, 1, 1, 1), torch.cat(hidden).repeat_interleave(b, 0),
                                          torch.cat(weights).repeat_interleave(b, 0)), t)
        if not torch.isfinite(maps).all():
            return None, None, None
        maps = maps.view(n, b, *maps.shape[1:])
        masks = torch.stack([irece.concept_mask(maps[i], tau, cfg.min_peak) for i, (_, tau, _) in enumerate(targets)])
        return masks, maps.flatten(2).max(2).values, maps

    # -- the diffusion-classifier gate -------------------------------------------------------------------------
    def classifier_prompts(self, concepts: tuple[str, ...], pairs: bool = False) -> torch.Tensor:
        """(H + 1, 77, D) hidden states of "a c" for each concept, then (pairs) of "a c1 and a c2" for each pair
        (irece.classifier_hypotheses' order), then of the null prompt (cached)."""
        key = ("classifier", concepts, pairs)
        if key not in self._loc_cache:
            named = [" and ".join(f"a {concepts[i]}" for i in h)
                     for h in irece.classifier_hypotheses(len(concepts), pairs)]
            self._loc_cache[key] = torch.cat([self.encode_prompt(p) for p in named] + [self.null_hidden])
        return self._loc_cache[key]

    def presence_steps(self, x, t, cfg: irece.IreceConfig, cond: torch.Tensor | None = None,
                       decided: Callable | None = None) -> Machine:
        """(B, K) diffusion-classifier presence scores of the contrast set's concepts at x_t, from the standard
        UNet: x0 predicted with the null prompt (one row per image), re-noised at each t' in
        cfg.classifier_timesteps with fixed noise (the same for every request, so a request's score does not
        depend on its batch), and denoised under each concept's prompt (with cfg.classifier_pairs, each pair's too)
        and the null prompt (K + 1 rows per image and t', or K + 1 + K(K-1)/2; one call per t'). With the request's
        conditioning `cond` (1 or B, 77, D), the UNet(s) of cfg.conditioning_unet also denoise under it (the standard
        one: one more row per image in the same call; the erased one: its own call), and the machine returns (scores,
        conditioning scores (B, K)) (irece.conditioning_scores against the single prompts and null; "both": the
        higher of the two); else (scores, None).

        `decided(bounds)` (the gate's decision rule) lets the machine stop before the last t': after each t' it gets
        irece.ScoreBounds, the range the final scores can still reach, and where it says every decision is already
        taken, the machine returns the mean over the t' it ran (which decides as the final scores would)."""
        concepts = self.contrast_set(cfg)
        hypotheses = irece.classifier_hypotheses(len(concepts), cfg.classifier_pairs)
        hidden = self.classifier_prompts(concepts, cfg.classifier_pairs)
        b, k1 = x.shape[0], hidden.shape[0]
        singles = list(range(len(concepts))) + [k1 - 1]  # the conditioning is compared with single prompts and null
        alphas = self.alphas_cumprod
        eps0 = yield Call("eps", (x, hidden[-1:].expand(b, -1, -1)), t, "standard")
        x0 = irece.predicted_x0(x, eps0, alphas[int(t)])
        readers = () if cond is None else {"standard": ("standard",), "erased": ("erased",),
                                           "both": ("standard", "erased")}[cfg.conditioning_unet]
        errors, eps_ref, eps_cond = [], [], {r: [] for r in readers}
        cond_b = cond.expand(b, -1, -1).to(hidden) if readers else None  # one row per image
        for j, t_prime in enumerate(cfg.classifier_timesteps):
            xi = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(CLASSIFIER_SEED + j)).to(x0)
            x_tp = irece.renoise(x0, xi, alphas[t_prime])
            rows, hid = x_tp.repeat_interleave(k1, 0), hidden.repeat(b, 1, 1)
            if "standard" in readers:  # the request's own conditioning: b more rows
                rows, hid = torch.cat([rows, x_tp]), torch.cat([hid, cond_b])
            eps = yield Call("eps", (rows, hid), torch.tensor(t_prime), "standard")
            ref = eps[:b * k1]
            errors.append(((ref - xi) ** 2).flatten(1).mean(1).view(b, k1))
            if readers:
                eps_ref.append(ref.view(b, k1, *ref.shape[1:])[:, singles])
            if "standard" in readers:
                eps_cond["standard"].append(eps[b * k1:])
            if "erased" in readers:  # the model that draws, under the same conditioning
                eps_cond["erased"].append((yield Call("eps", (x_tp, cond_b), torch.tensor(t_prime), "erased")))
            done, total = j + 1, len(cfg.classifier_timesteps)
            if decided is not None and done < total:
                partial = self._scores_so_far(errors, eps_ref, eps_cond, readers, cfg, hypotheses)
                if decided(irece.ScoreBounds(*partial, done, total)):
                    return partial
        return self._scores_so_far(errors, eps_ref, eps_cond, readers, cfg, hypotheses)

    @staticmethod
    def _scores_so_far(errors, eps_ref, eps_cond, readers, cfg, hypotheses):
        """(scores, conditioning scores or None), each the mean over the t' computed so far."""
        # single prompts: each prompt's share is its concept's score (no membership matrix to build per call)
        scores = irece.classifier_scores(torch.stack(errors, 1),
                                         hypotheses=hypotheses if cfg.classifier_pairs else None)
        if not readers:
            return scores, None
        ref = torch.stack(eps_ref, 1)
        return scores, torch.stack([irece.conditioning_scores(torch.stack(eps_cond[r], 1), ref)
                                    for r in readers]).amax(0)

    def presence(self, x: torch.Tensor, t: torch.Tensor, cfg: irece.IreceConfig) -> torch.Tensor:
        """(B, K) presence scores of the contrast set at x_t under cfg's gate (benchmarks, calibration)."""
        if cfg.gate == "classifier":
            return drive(self.presence_steps(x, t, cfg), self.backend)[0]
        if cfg.gate == "head":
            columns = self.head_columns(self.contrast_set(cfg))
            return irece.head_scores(drive(self.head_steps(x, t), self.backend))[:, columns]
        return irece.presence_scores(self.concept_maps(x, t, self.contrast_set(cfg)), cfg.tau)

    @cached_property
    def null_hidden(self) -> torch.Tensor:
        """(1, 77, D) hidden states of the empty prompt."""
        return self.encode_prompt("")

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """The noise schedule's cumulative alphas (the same for every number of sampling steps)."""
        return DDIMScheduler.from_config(self.scheduler_config).alphas_cumprod

    def _localize_classifier(self, x, t, cfg, targets, conditioning=None):
        """The diffusion-classifier gate: score every concept of the contrast set; only targets whose score
        reaches their threshold are localized (the paper's masks), and only in the images that show them. Where
        no target passes, no localizer call runs and x_t is left exactly as it was. With conditioning "null", the
        request's conditioning is scored in the same calls and dropped from the images where it carries a target
        (its score reaches cfg.conditioning_threshold), whether or not the image shows the target yet."""
        concepts = self.contrast_set(cfg)
        scoring = cfg.conditioning == "null" and conditioning is not None
        bars = [(concepts.index(c), thr) for c, _, thr in targets]  # each target's column and presence threshold

        def carried_bar(shown: torch.Tensor) -> torch.Tensor:
            """An image that shows the target needs less evidence against its conditioning."""
            return torch.where(shown, cfg.conditioning_threshold_shown, cfg.conditioning_threshold)

        def decided(b: irece.ScoreBounds) -> bool:
            """Every decision below is taken: each target shown or not, its conditioning carried or not, and (with
            split_masks) each other concept shown or not."""
            for k, thr in bars:
                if not b.settled(b.scores[:, k], thr).all():
                    return False
                if b.carried is not None and not b.settled(b.carried[:, k], carried_bar(b.scores[:, k] >= thr)).all():
                    return False
            return not cfg.split_masks or all(b.settled(b.scores[:, k], cfg.threshold).all()
                                              for k in range(len(concepts)) if k not in dict(bars))

        scores, carried = yield from self.presence_steps(x, t, cfg, conditioning.cond if scoring else None,
                                                         decided if cfg.classifier_early_exit else None)
        if not torch.isfinite(scores).all() or (carried is not None and not torch.isfinite(carried).all()):
            return self._fail_closed(x, cfg, targets, "presence score")
        if carried is not None:
            rows = torch.stack([carried[:, k] >= carried_bar(scores[:, k] >= thr) for k, thr in bars])
            if rows.any():
                conditioning.drop(rows.any(0))
        b = x.shape[0]
        present = {c: scores[:, concepts.index(c)] >= thr for c, _, thr in targets}
        hit = [tg for tg in targets if present[tg[0]].any()]
        masks, peaks = {}, {}
        if hit:
            # split_masks: the other concepts the gate sees where a target is shown are localized in the same
            # call, and each cell goes to the concept whose map is highest there (two-shape scenes keep the other)
            others = []
            if cfg.split_masks:
                shows_target = torch.stack([present[c] for c, _, _ in hit]).any(0)
                names = {c for c, _, _ in targets}
                others = [(k, (scores[:, i] >= cfg.threshold) & shows_target) for i, k in enumerate(concepts)
                          if k not in names]
                others = [(k, rows) for k, rows in others if rows.any()]
            m, p, maps = yield from self._concept_maps(x, t, cfg, hit + [(k, cfg.tau, cfg.threshold)
                                                                         for k, _ in others])
            if m is None:
                return self._fail_closed(x, cfg, targets, "concept map")
            if others:
                shown = torch.stack([present[c] for c, _, _ in hit] + [rows for _, rows in others])
                m = irece.split_among_shown(maps, m, shown)
            for i, (c, _, _) in enumerate(hit):
                masks[c] = m[i] * present[c][:, None, None].to(m.dtype)
                peaks[c] = float(p[i].max())
        union = torch.zeros(b, *x.shape[2:], dtype=torch.float32, device=x.device)
        reports = []
        for c, _, threshold_c in targets:
            mask = masks.get(c)
            if mask is not None:
                union = torch.maximum(union, mask.to(union))
            reports.append(irece.ConceptReport(c, float(mask.mean()) if mask is not None else 0.0,
                                               peaks.get(c, float("nan")), bool(mask is not None and mask.any()),
                                               float(scores[:, concepts.index(c)].max()), threshold_c,
                                               float(carried[:, concepts.index(c)].max()) if carried is not None
                                               else float("nan"),
                                               images=None if mask is None else irece.masked_images(mask)))
        return union, reports

    # -- the concept-head gate -------------------------------------------------------------------------------
    def head_columns(self, concepts) -> list[int]:
        """The concept head's output index of each concept; a concept it was not trained on cannot be gated."""
        missing = [c for c in concepts if c not in self.head_concepts]
        if missing:
            raise ValueError(f"gate 'head': the model's concept head has no output for {missing[0]!r}"
                             + ("" if self.head_concepts else " (this model folder has no concept_head/)"))
        return [self.head_concepts.index(c) for c in concepts]

    def head_steps(self, x, t) -> Machine:
        """(B, K_head, h, w) concept probabilities at x_t: one standard-UNet row per image, null prompt."""
        return (yield Call("concept_head", (x, self.null_hidden.expand(x.shape[0], -1, -1)), t))

    def _localize_head(self, x, t, cfg, targets):
        """The concept-head gate: each target's presence score is its most confident cell; where it reaches the
        target's threshold, the target's own cells (probability >= its tau) are its mask. Where no target passes,
        x_t is left exactly as it was. The union mask grows by cfg.grow cells, but not into cells where the head
        sees a concept that is not a target (probability >= cfg.tau): a neighbouring shape is not the mask's edge."""
        columns = self.head_columns([c for c, _, _ in targets])
        every = yield from self.head_steps(x, t)
        if not torch.isfinite(every).all():
            return self._fail_closed(x, cfg, targets, "concept head's output")
        probs = every[:, columns].float()
        others = [k for k in range(every.shape[1]) if k not in columns]
        spare = (every[:, others] >= cfg.tau).any(1) if others and cfg.grow else None
        scores = irece.head_scores(probs)
        thresholds = torch.tensor([thr for _, _, thr in targets], dtype=scores.dtype, device=scores.device)
        masks = irece.head_masks(probs, torch.tensor([tau for _, tau, _ in targets]), scores >= thresholds)
        if cfg.keep_others:  # the others an image shows, by the head's score against the request's threshold
            rest = every[:, others].float()
            seen = irece.head_scores(rest) >= cfg.threshold
        reports = [irece.ConceptReport(c, float(masks[:, i].mean()), float(probs[:, i].max()),
                                       bool(masks[:, i].any()), float(scores[:, i].max()), thr,
                                       images=irece.masked_images(masks[:, i]),
                                       contest=irece.head_contest(probs[:, i], rest, seen) if cfg.keep_others
                                       else None)
                   for i, (c, _, thr) in enumerate(targets)]
        return irece.grow_mask(masks.amax(1).to(torch.float32), cfg.grow, spare), reports

    def contrast_set(self, cfg: irece.IreceConfig) -> tuple[str, ...]:
        """The concepts that compete in the localization prompt: the operator's, then the configured
        vocabulary, then the model folder's own concepts.json (if any), each once."""
        return tuple(dict.fromkeys(tuple(cfg.concepts) + tuple(cfg.vocabulary) + self.vocabulary))

    def contrastive_localization(self, concepts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of "a c1 and a c2 and ..." and the (K, 77) token weights of each concept in it (cached)."""
        key = ("contrastive", concepts)
        if key not in self._loc_cache:
            prompt = " and ".join(f"a {c}" for c in concepts)
            ids, _ = self.token_ids(prompt)
            n = self.tokenizer.model_max_length
            w = torch.stack([irece.token_weights(ids, self.tokenizer(c, add_special_tokens=False).input_ids, n)
                             for c in concepts])
            self._loc_cache[key] = (self.encode_prompt(prompt), w)
        return self._loc_cache[key]

    def concept_maps(self, x: torch.Tensor, t: torch.Tensor, concepts: tuple[str, ...]) -> torch.Tensor:
        """(B, K, h, w) maps of the competing concepts at x_t, from one pass of the standard UNet."""
        hidden, w = self.contrastive_localization(concepts)
        b = x.shape[0]
        return self.backend.concept_map(x, t, hidden.expand(b, -1, -1), w[None].expand(b, -1, -1))

    @staticmethod
    def _fail_closed(x: torch.Tensor, cfg: irece.IreceConfig, targets: list, what: str) -> tuple[torch.Tensor, list]:
        """A NaN/inf latent or concept map cannot be localized: refuse the request (nonfinite="error"), or mask the
        whole latent (nonfinite="full_mask"; in "replace" mode x_t* becomes fresh noise). Never an empty mask."""
        if cfg.nonfinite == "error":
            raise irece.NonFiniteError(f"IRECE cannot localize: the {what} at t* is not finite")
        mask = torch.ones(x.shape[0], *x.shape[2:], dtype=torch.float32, device=x.device)
        return mask, [irece.ConceptReport(c, 1.0, float("nan"), True) for c, _, _ in targets]

    def _localize_contrastive(self, x, t, cfg, targets):
        """One pass of the gated localizer over the contrast set: every concept competes; targets get their own
        tau and threshold, the other concepts are scored but never masked (threshold above any score)."""
        concepts = self.contrast_set(cfg)
        hidden, w = self.contrastive_localization(concepts)
        tau = torch.full((len(concepts),), float(cfg.tau))
        threshold = torch.full((len(concepts),), 2.0)  # scores lie in [0, 1]: non-targets never pass
        for c, tau_c, threshold_c in targets:
            tau[concepts.index(c)], threshold[concepts.index(c)] = tau_c, threshold_c
        b = x.shape[0]
        maps, scores, masks = yield Call("gate", (x, hidden.expand(b, -1, -1), w[None].expand(b, -1, -1)), t,
                                         shared=(tau, threshold))
        if not torch.isfinite(maps).all():
            return self._fail_closed(x, cfg, targets, "concept map")
        union = torch.zeros(b, *maps.shape[2:], dtype=maps.dtype, device=maps.device)
        reports = []
        for c, _, threshold_c in targets:
            k = concepts.index(c)
            union = torch.maximum(union, masks[:, k])
            reports.append(irece.ConceptReport(c, float(masks[:, k].mean()), float(maps[:, k].max()),
                                               bool(masks[:, k].any()), float(scores[:, k].max()), threshold_c,
                                               images=irece.masked_images(masks[:, k])))
        return union, reports

    # -- the loop --------------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
                steps: int, cfg: irece.IreceConfig | None = None, seed: int = 0,
                timings: dict | None = None, callback: StepCallback | None = None,
                scheduler: DDIMScheduler | None = None, trajectory: list | None = None
                ) -> tuple[torch.Tensor, irece.IreceReport | None]:
        """DDIM with classifier-free guidance on the erased UNet; IRECE perturbs x at step t*. `trajectory`: an
        inverted latent's inversion trajectory (invert_steps), for cfg.keep_outside."""
        return drive(self.denoise_steps(x, cond, uncond, guidance, steps, cfg, seed, timings, callback, scheduler,
                                        trajectory), self.backend)

    def denoise_steps(self, x, cond, uncond, guidance, steps, cfg=None, seed=0, timings=None, callback=None,
                      scheduler=None, trajectory=None) -> Machine:
        """`denoise` as a machine: a UNet call per step (both guidance branches in one), the localizer at t*."""
        scheduler = scheduler or self.scheduler(steps)
        # with conditioning "null", an image whose conditioning IRECE drops continues on uncond (else the empty prompt)
        dropping = cfg is not None and cfg.conditioning == "null"
        conditioning = Conditioning(cond, uncond if uncond is not None or not dropping else self.null_hidden)
        keep = trajectory if cfg is not None and cfg.keep_outside else None
        hook = IreceStep(self, cfg, len(scheduler.timesteps), seed, conditioning, keep) if cfg and cfg.concepts \
            else None
        t0 = time.perf_counter()
        eps = guided_eps("erased", conditioning, uncond, guidance)
        x = yield from sample(hook.steer(eps) if hook else eps, x.to(self.backend.device), scheduler,
                              (hook,) if hook else (), callback)
        if hook:
            x = hook.keep_outside(len(scheduler.timesteps), x)  # the last level: the input's own latent
        if hook and not torch.isfinite(x).all():  # e.g. a full mask cannot help a non-finite conditioning
            raise irece.NonFiniteError("the denoised latent is not finite: no image IRECE cannot vouch for")
        timings = timings if timings is not None else {}
        if hook:
            timings["localization"] = hook.seconds
        timings["denoising"] = time.perf_counter() - t0 - timings.get("localization", 0.0)
        return x, hook.report if hook else None

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
            trajectory = [] if cfg is not None and cfg.keep_outside else None
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
                                                  callback, trajectory=trajectory)
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
        if trajectory and report is not None and report.mask is not None and report.intervened:
            reference = yield Call("vae_decode", (trajectory[0].to(x),))  # the input's own latent
            decoded = irece.keep_pixels_outside(decoded, reference, report.mask, report.contest)
        return to_unit(decoded)


# -- the recipe's parts: a sampler over a noise-prediction machine, guidance as a wrapper, IRECE as a hook -----
EpsSteps = Callable[[torch.Tensor, torch.Tensor], Machine]  # (x_t, t) -> a machine returning the predicted noise
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


class Conditioning:
    """A request's text conditioning (1 or B, 77, D), which IRECE may take from some of its images mid-loop
    (IreceConfig.conditioning "null"): those rows are conditioned on `null` from then on."""

    def __init__(self, cond: torch.Tensor, null: torch.Tensor):
        self.cond, self.null = cond, null
        self.dropped = False  # some image lost its conditioning

    def drop(self, rows: torch.Tensor) -> None:
        """rows: bool (B,) - these images' conditioning becomes the null conditioning. `dropped` says only what
        changed: a request already on the null prompt (an inverted latent) has nothing to lose."""
        cond = self.cond.expand(rows.shape[0], -1, -1)
        null = self.null.to(cond).expand_as(cond)
        changed = rows.to(cond.device) & (cond != null).flatten(1).any(1)
        self.cond = torch.where(rows[:, None, None].to(cond.device), null, cond)
        self.dropped = self.dropped or bool(changed.any())


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


class IreceStep:
    """IRECE as a step hook: at each planned step (t*, or each concept's tuned t*) the standard UNet localizes
    the concepts and the masked latent is replaced by seeded noise; with conditioning "null", images whose
    conditioning carries a target, or in which the target came back after IRECE re-noised it (a recheck), lose
    their conditioning for the rest of the loop. Owns the request's report."""

    def __init__(self, pipe: "Pipeline", cfg: irece.IreceConfig, steps: int, seed: int,
                 conditioning: Conditioning | None = None, trajectory: list | None = None):
        self.pipe, self.cfg, self.seed, self.conditioning = pipe, cfg, seed, conditioning
        self.renoised_at: torch.Tensor | None = None  # (B,) the last step IRECE re-noised each image at (-1: never)
        self.step = -1  # the loop's step index, as the hook last saw it
        self.plan = cfg.plan(steps)
        self.report: irece.IreceReport | None = None
        self.seconds = 0.0
        if trajectory is not None and len(trajectory) != steps + 1:
            raise ValueError(f"keep_outside needs the inversion's {steps + 1} latents for {steps} steps, got "
                             f"{len(trajectory)}: invert and denoise with the same number of steps")
        self.trajectory = trajectory  # keep_outside: the inversion's latents, input first (steps + 1)

    @property
    def renoised(self) -> torch.Tensor | None:
        """(B,) images IRECE re-noised at an earlier step (None: it has not localized yet)."""
        return None if self.renoised_at is None else self.renoised_at >= 0

    def __call__(self, i: int, t: torch.Tensor, x: torch.Tensor) -> Machine:
        self.step = i
        x = self.keep_outside(i, x)
        if i not in self.plan:
            return x
        return self._intervene(i, t, x)

    def steer(self, eps: EpsSteps) -> EpsSteps:
        """cfg.negative_guidance: the loop's noise prediction, steered away inside the mask from the concepts IRECE
        re-noised (irece.steer_away) in the images it re-noised, from the step it did on: one standard-UNet call of
        1 + n rows per such image and step (the null prompt, each concept's localization prompt), each image steered
        away from the concepts re-noised in it only (a batch's images can show different ones); with
        cfg.negative_guidance_steps K, only in the K steps from the last step it re-noised the image at. Images it
        left alone (or past their K steps) keep the loop's own prediction, bit for bit."""
        if not self.cfg.negative_guidance:
            return eps
        prompts: dict[tuple[str, ...], torch.Tensor] = {}  # re-noised concepts -> [null; their prompts] hidden states

        def steered(x, t):
            e = yield from eps(x, t)
            if self.renoised is None or not self.renoised.any():
                return e
            steered_rows = self.renoised
            if self.cfg.negative_guidance_steps:
                steered_rows = steered_rows & (self.step - self.renoised_at < self.cfg.negative_guidance_steps)
                if not steered_rows.any():
                    return e
            b = x.shape[0]
            covers: dict[str, torch.Tensor] = {}  # concept -> (B,) the images it was re-noised in, over all steps
            for c in self.report.concepts:
                if c.intervened:
                    covers[c.concept] = covers.get(c.concept, torch.zeros(b, dtype=torch.bool)) | c.covers(b)
            concepts = tuple(covers)
            if concepts not in prompts:  # the set changes only where IRECE intervenes, not every step
                prompts[concepts] = torch.cat([self.pipe.null_hidden] + [self.pipe.localization(c, self.cfg.template)[0]
                                                                         for c in concepts])
            hidden = prompts[concepts]
            rows = steered_rows.nonzero()[:, 0].to(x.device)
            n = hidden.shape[0]
            out = yield Call("eps", (x[rows].repeat_interleave(n, 0), hidden.repeat(len(rows), 1, 1)), t, "standard")
            out = out.view(len(rows), n, *out.shape[1:]).to(e)
            e = e.clone()
            weights = torch.stack([covers[c] for c in concepts], 1)[rows.cpu()]  # (rows, n)
            e[rows] = irece.steer_away(e[rows], out[:, 0], out[:, 1:], self.report.mask.to(e.device)[rows],
                                       self.cfg.negative_guidance, weights)
            return e
        return steered

    def keep_outside(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """keep_outside: in the images IRECE re-noised, the latent outside the union mask so far becomes the
        inversion's at the level of step i (step n: the input's latent). Images it left alone are untouched."""
        if self.trajectory is None or self.renoised is None or not self.renoised.any():
            return x
        level = self.trajectory[len(self.trajectory) - 1 - i].to(x)
        m = self.report.mask.to(x)[:, None]
        return torch.where(self.renoised[:, None, None, None].to(x.device), m * x + (1 - m) * level, x)

    def _intervene(self, i: int, t: torch.Tensor, x: torch.Tensor) -> Machine:
        t0 = time.perf_counter()
        mask, concepts = yield from self.pipe.localize_steps(x, t, self.cfg, self.plan[i], self.conditioning)
        hit = irece.masked_images(mask)
        if self.cfg.conditioning == "null" and self.cfg.gate == "head" and self.conditioning is not None:
            # the head reads the image, not the conditioning: where it sees the target, whatever conditioning drew
            # it (a learned embedding, a prompt naming it) would redraw it into the re-noised region
            if hit.any():
                self.conditioning.drop(hit)
        elif self.cfg.conditioning == "null" and self.conditioning is not None and self.renoised is not None:
            # the concept came back where IRECE had already re-noised it: the conditioning redraws it
            back = hit & self.renoised
            if back.any():
                self.conditioning.drop(back)
        at = torch.full(hit.shape, -1, dtype=torch.long, device=hit.device) if self.renoised_at is None \
            else self.renoised_at
        self.renoised_at = torch.where(hit, i, at)
        # noise seeded per request and step: the same request gives the same image alone or beside others
        xi = torch.randn(x.shape, generator=torch.Generator().manual_seed((self.seed + 1_000_003 + i) % 2**63)).to(x)
        x = irece.perturb(x, mask.to(x), xi, self.cfg.mode)
        contests = [c.contest for c in concepts if c.contest is not None]
        step = irece.IreceReport(i, int(t), concepts, mask,
                                 unconditioned=self.conditioning is not None and self.conditioning.dropped,
                                 contest=torch.stack(contests).amax(0) if contests else None)
        self.report = step if self.report is None else self.report.merge(step)
        self.seconds += time.perf_counter() - t0
        return x


def _split_keep(text: str, sep: str) -> list[str]:
    pieces = text.split(sep)
    out = []
    for i, p in enumerate(pieces):
        if p:
            out.append(p)
        if i < len(pieces) - 1:
            out.append(sep)
    return out

