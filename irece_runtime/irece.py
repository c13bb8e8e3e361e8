"""IRECE as pure functions: aggregate cross-attention maps -> mask -> perturb the latent.

    maps (per layer)  --aggregate_maps-->  concept map (latent resolution)
    concept map       --concept_mask--->   M = [minmax(map) >= tau]
    x_t, M, xi        --perturb-------->   x*_t = (1 - M) * x_t + M * xi      ("replace", the paper's rule)
                                           x*_t = x_t + M * xi                ("add")

No I/O and no model here: the localizer (standard UNet + attention processors) produces the layer maps,
the denoising loop calls these at step t*.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

PERTURB_MODES = ("replace", "add")
# off: the paper's always-intervene; classifier: a diffusion classifier (the standard UNet's noise-prediction error
# under each concept prompt); head: the model's concept head (concept_head.py) on the standard UNet's features at
# x_t: its per-cell probabilities are the presence score (the highest cell) and the concept's own mask (cells >= tau),
# one UNet row (gates.py)
GATES = ("off", "classifier", "head")
# the diffusion classifier's re-noising timesteps t' and softmax temperature (BENCHMARKS.md, committed world,
# t* = 0.5: three t' hold an erased concept's CRR at 0-13% with the gate calibrated at 3% false positives, t' = 300
# alone lets 6-44% through at its calibrated threshold (same AUC, 0.90 and 0.91, noisier scores), at a third of
# the cost: 1.08x paper IRECE against 1.35x (torch); the temperature is flat in 20..200)
CLASSIFIER_TIMESTEPS = (100, 300, 500)
# the gate of every "gated" setting (benchmarks, demo): the diffusion classifier (held-out presence AUC on
# single-shape scenes 0.99 on both worlds, against 0.49-0.57 for competing cross-attention; BENCHMARKS.md)
PRESENCE_GATE = "classifier"
CLASSIFIER_TEMPERATURE = 50.0
# IRECE fails closed where x_t or the concept map at t* is not finite (an overflowing input): a NaN map min-max
# normalizes to NaN, NaN >= tau is False, and the mask would come out empty - the latent let through unprotected.
NONFINITE = ("error", "full_mask")  # error: refuse the request; full_mask: re-noise the whole latent
# the conditioning defence (issue #12): "keep" the request's conditioning (the paper), or "null": an image whose
# conditioning carries a target concept is denoised on the negative/null prompt from then on. A learned embedding
# that drew the erased concept draws it again into the region IRECE re-noised; without it the erased UNet fills the
# region from its surroundings. Whether a conditioning carries a concept is asked of the standard UNet, beside the
# classifier gate (conditioning_scores): does its noise prediction reproduce that concept's prompt's?
CONDITIONING = ("keep", "null")
# measured on the mini world (16 generations each, star-erased ESD-u): white-box textual inversion of star scores
# 0.30-0.99 for star, of triangle 0.00-0.03, "a star" 0.93-1.00, "a red triangle on a white background" 0.00-0.02,
# the empty prompt 0.00 (BENCHMARKS.md, "Learned embeddings")
CONDITIONING_THRESHOLD = 0.25
# where the gate says the image shows the target, a lower bar: white-box TI of star from another seed scores 0.12-0.27
# at t* (the image shows star, the gate fires), benign embeddings 0.00-0.03, the empty prompt 0.00
CONDITIONING_THRESHOLD_SHOWN = 0.1
CONDITIONING_TEMPERATURE = 10.0
# which UNet reads the request's conditioning. The standard one asks whether it *names* a concept; the erased one,
# whether it *steers the model that draws* towards the concept (as the standard model renders the concept's prompt).
# Each alone is fooled one way (world v1, t* = 0.5, 16 generations each): an embedding optimised through the defence
# exploits the standard reader - white-box TI of star on UCE after 10 adaptive steps scores 0.00 (max 0.11) with
# the standard reader and 0.14 (max 0.66) with the erased one, plain TI 0.77 / 0.88; and the standard reader mistakes
# benign embeddings learned on an erased model for the concept - TI of cross on star-erased ESD-u draws crosses
# (14 of 16) and scores 0.22-0.85 for star with the standard reader, 0.00-0.02 with the erased one. The erased one
# misses plain TI on world v4: white-box TI of star on ESD-x scores under its bar (4 of 16 images show star under the
# full defence; 1 of 16 with "both"). "both" (the higher score counts) is the default, measured on world v4
# (`irece bench conditioning`, held out, 64 attacking and 336 benign conditionings): it catches 73% of attacking
# conditionings against 34% for the erased reader, and drops 2 benign ones of 336 (0.6%) against 0. Its cost: a text
# prompt naming the concept loses its conditioning, which on UCE (whose erasure acts through that conditioning) lets
# an inverted star render regenerated with "an image of a star" come back in 3 of 16 images (0 with the erased one).
CONDITIONING_UNETS = ("standard", "erased", "both")
# the full defence's later looks, behind the gate: what a dropped conditioning left half-drawn at t* = 0.5 is caught
# at 0.7 of the schedule. White-box textual inversion of star, CRR with UCE / ESD-x / ESD-u / Receler (16 images
# each): with the 0.7 look 0/0/0/6%, without it 19/0/0/6%, the look without the conditioning defence 88/12/6/6%.
# The look at 0.9 sees nearly the final image: white-box PGD on a reference image (8 steps, UCE) that keeps the gate's
# score under its threshold at t* and 0.7 brings star back in 38% of images; with 0.9 as well, 19% (BENCHMARKS.md,
# "Learned embeddings and adaptive attacks"). Each look costs one pass of the gate.
RECHECK = (0.7, 0.9)


class NonFiniteError(RuntimeError):
    """IRECE could not localize: x_t or the concept map at t* holds NaN or inf (policy nonfinite="error")."""


PAPER_TAU = 0.4  # the paper's localization threshold


@dataclass(frozen=True)
class IreceConfig:
    concepts: tuple[str, ...] = ()
    tau: float = PAPER_TAU
    t_star: float | int = 0.3  # a fraction of the schedule (float) or a step index (int)
    mode: str = "replace"
    template: str = "a photo of a {concept}"  # the localization prompt c_tgt
    per_concept: dict = field(default_factory=dict)  # concept -> {"tau", "t_star", "threshold"} (`irece bench tune`)
    gate: str = "off"  # "head" / "classifier": intervene only where a concept is present (GATES)
    threshold: float = 0.5  # the presence gate's threshold (the model's calibration block: `irece calibrate`)
    vocabulary: tuple[str, ...] = ()  # the classifier gate's competing concepts, beside the model's own
    classifier_timesteps: tuple[int, ...] = CLASSIFIER_TIMESTEPS  # the classifier gate's re-noising t' (cost: K+1
    # UNet rows per image and t')
    classifier_early_exit: bool = True  # stop scoring once every decision is taken (ScoreBounds; reports then give
    # the mean over the t' that ran)
    keep_outside: bool = False  # inverted latents: once IRECE re-noised an image, outside its mask the latent follows
    # the inversion's trajectory and ends on the input's latent (blended latent diffusion), and the pixels outside it
    # are the input latent's decode (keep_pixels_outside): only the mask is redrawn
    keep_others: bool = False  # keep_outside (gate "head"): inside the mask too, the pixels where the first look's
    # head saw another concept (its score >= threshold) more probable than the targets stay the input's (contest):
    # at 8x8 a target's cells share pixels with a shape beside it, and those pixels are the other shape's
    nonfinite: str = "error"  # non-finite x_t or concept map at t*: "error" or "full_mask" (never an empty mask)
    conditioning: str = "keep"  # "null": an image whose conditioning carries a target (classifier) or in which the
    # target was seen (head) loses it
    conditioning_threshold: float = CONDITIONING_THRESHOLD  # conditioning score from which it counts as carried
    conditioning_threshold_shown: float = CONDITIONING_THRESHOLD_SHOWN  # the same, in images the gate says show it
    conditioning_unet: str = "both"  # which UNet reads the conditioning (CONDITIONING_UNETS; erased/both: one
    # erased-UNet call of B rows per t')
    grow: int = 0  # cells by which the mask grows (3x3 dilation) before re-noising: a concept head's cells hold a
    # shape's core, and the edge cells it leaves out carry enough of the shape to redraw it (grow_mask)
    recheck: tuple[float | int, ...] = ()  # later points of the schedule (like t_star) where IRECE runs again: a
    # conditioning that redraws the concept after t* is caught there (behind a gate, only images that show it)
    recheck_threshold: tuple[float, ...] = ()  # the presence threshold of each recheck look (empty: `threshold`): a
    # gate's scores at 0.7 or 0.9 of the schedule are not those at t* (the head, fitted at 0.5, read 11 of 32 benign
    # inverted renders as the target at 0.7 under t*'s threshold, 2 at t*), so each look is calibrated apart
    negative_guidance: float = 0.0  # once IRECE re-noised an image, inside its mask the rest of the loop is steered
    # away from the concepts it re-noised, by the standard UNet's direction towards them (steer_away); 0: the paper
    negative_guidance_steps: int = 0  # steer only this many steps after each step IRECE re-noised an image at (its
    # cost is one standard-UNet call a step; measured at t* 0.5 of 25 steps: 6 keep most of the effect, 3 do not);
    # 0: to the end
    negative_guidance_every: int = 1  # the standard UNet's direction towards the concepts is computed every this many
    # steps and reused between (a guidance term changes slowly from step to step: DeepCache reuses UNet features,
    # Adaptive Guidance drops guidance late on); computed afresh wherever an image is re-noised again. 1: every step

    def __post_init__(self):
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.mode not in PERTURB_MODES:
            raise ValueError(f"mode must be one of {PERTURB_MODES}, got {self.mode!r}")
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}, got {self.conditioning!r}")
        if self.conditioning_unet not in CONDITIONING_UNETS:
            raise ValueError(f"conditioning_unet must be one of {CONDITIONING_UNETS}, got {self.conditioning_unet!r}")
        if self.conditioning == "null" and self.gate not in ("classifier", "head"):
            raise ValueError("conditioning 'null' drops a conditioning where a presence gate saw the concept: it "
                             "needs gate='head' or gate='classifier'")
        for name in ("conditioning_threshold", "conditioning_threshold_shown"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.keep_others and not (self.keep_outside and self.gate == "head"):
            raise ValueError("keep_others keeps pixels of keep_outside's composite where the concept head sees another "
                             "concept: it needs keep_outside=True and gate='head'")
        if isinstance(self.grow, bool) or not isinstance(self.grow, int) or self.grow < 0:
            raise ValueError(f"grow must be a whole number of cells >= 0, got {self.grow!r}")
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        if not self.classifier_timesteps or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1000 for t in self.classifier_timesteps):
            raise ValueError(f"classifier_timesteps must be one or more integers in 0..999, got "
                             f"{self.classifier_timesteps!r}")
        if isinstance(self.t_star, float) and not 0.0 <= self.t_star < 1.0:
            raise ValueError(f"t_star as a fraction must be in [0, 1), got {self.t_star}")
        g = self.negative_guidance
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"negative_guidance must be a finite number >= 0, got {g!r}")
        k = self.negative_guidance_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"negative_guidance_steps must be a whole number of steps >= 0, got {k!r}")
        e = self.negative_guidance_every
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"negative_guidance_every must be a whole number of steps >= 1, got {e!r}")
        if self.recheck_threshold and len(self.recheck_threshold) != len(self.recheck):
            raise ValueError(f"recheck_threshold must give one threshold per recheck look ({len(self.recheck)}), got "
                             f"{len(self.recheck_threshold)}")
        for thr in self.recheck_threshold:
            if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr):
                raise ValueError(f"recheck_threshold must hold finite numbers, got {thr!r}")
        for when in self.recheck:
            if isinstance(when, bool) or not isinstance(when, (int, float)) or (
                    isinstance(when, float) and not 0.0 <= when < 1.0) or (isinstance(when, int) and when < 0):
                raise ValueError(f"recheck must hold fractions in [0, 1) or step indices, got {when!r}")

    @classmethod
    def defaults(cls) -> "IreceConfig":
        """The one source of IRECE's defaults: server config, CLI flags and benchmarks read them from here."""
        return cls()

    def step_index(self, num_steps: int) -> int:
        """t* as an index into a schedule of num_steps denoising steps."""
        if isinstance(self.t_star, int) and not isinstance(self.t_star, bool):
            if not 0 <= self.t_star < num_steps:
                raise ValueError(f"t_star index {self.t_star} outside 0..{num_steps - 1}")
            return self.t_star
        return min(num_steps - 1, int(round(self.t_star * num_steps)))

    def plan(self, num_steps: int) -> dict[int, list[tuple[str, float, float]]]:
        """step index -> [(concept, tau, threshold)]: where each concept is localized, with its own settings if
        tuned; a recheck look with its own threshold where recheck_threshold gives one. A concept is localized once
        per step (the earlier point's settings where two points fall on one step)."""
        out: dict[int, list[tuple[str, float, float]]] = {}
        for c in self.concepts:
            o = self.per_concept.get(c, {})
            threshold = float(o.get("threshold", self.threshold))
            looks = [(o.get("t_star", self.t_star), threshold)]
            looks += list(zip(self.recheck, self.recheck_threshold or [threshold] * len(self.recheck)))
            for when, thr in looks:
                at = replace(self, t_star=when, per_concept={}, recheck=(), recheck_threshold=())
                step = at.step_index(num_steps)
                if all(name != c for name, _, _ in out.get(step, [])):
                    out.setdefault(step, []).append((c, float(o.get("tau", self.tau)), float(thr)))
        return dict(sorted(out.items()))


def off_schedule(cfg: IreceConfig, trained_at, num_steps: int, slack: float = 0.1) -> list[float]:
    """cfg's t* (each concept's, as fractions of a num_steps schedule) farther than `slack` from every point a
    concept head was trained at: there its scores and masks are weaker than measured (a head fitted at 0.5, at 0.3).
    The later looks (recheck) are not held to it: they only add interventions the first look missed."""
    if not trained_at:
        return []
    points = [step / num_steps for step in replace(cfg, recheck=(), recheck_threshold=()).plan(num_steps)]
    return [p for p in points if min(abs(p - float(q)) for q in trained_at) > slack]


def off_schedule_warning(cfg: IreceConfig, trained_at, num_steps: int) -> str | None:
    """The warning the server logs and `irece generate` prints where off_schedule finds a t*; None where none."""
    far = off_schedule(cfg, trained_at, num_steps)
    if not far:
        return None
    return (f"gate 'head': the concept head was trained at t = {', '.join(map(str, trained_at))}; t* here is "
            f"{', '.join(f'{p:.2f}' for p in far)}, where its scores and masks are weaker than measured")


def parse_t_star(value: str | float | int) -> float | int:
    """t* from a flag, config file or request: "0.3" (a fraction of the schedule) or "7" (a step index)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    try:
        return float(text) if any(ch in text for ch in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"t_star must be a fraction like 0.3 or a step index like 7, got {text!r}") from None


def aggregate_maps(layer_maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Per-layer concept maps (B, h_l*w_l, K), already head-averaged and token-weighted -> (B, K, H, W).

    Each layer's map is reshaped to its own grid (same aspect as the latent), bilinearly upsampled to the
    latent grid (H, W), and the layers are averaged with equal weight.
    """
    if not layer_maps:
        raise ValueError("no cross-attention maps were recorded")
    H, W = int(size[0]), int(size[1])  # static under tracing; batch and K stay dynamic
    out = 0.0
    for m in layer_maps:
        scale = int(round((H * W / int(m.shape[1])) ** 0.5))
        grid = m.transpose(1, 2).reshape(m.shape[0], -1, H // scale, W // scale)
        out = out + F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)
    return out / len(layer_maps)


def minmax(concept_map: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalize each map of (B, H, W) to [0, 1]."""
    flat = concept_map.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    return ((flat - lo[:, None]) / (hi - lo + eps)[:, None]).view_as(concept_map)


def concept_mask(concept_map: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, H, W) raw concept map -> binary float mask M: minmax(map) >= tau (the paper's)."""
    return (minmax(concept_map) >= tau).to(concept_map.dtype)


def head_scores(probs: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) concept-head probabilities -> (B, K) presence scores: each concept's most confident cell."""
    return probs.flatten(2).amax(2)


def head_masks(probs: torch.Tensor, tau: float | torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) probabilities, tau (scalar or (K,)), present (B, K) -> (B, K, h, w) float masks: cells where a
    concept's probability reaches its tau, in images whose score passed its threshold. The probabilities are
    absolute (not min-max normalised), so an image without the concept gets no cell even with its gate open."""
    tau = torch.as_tensor(tau, dtype=probs.dtype, device=probs.device).reshape(-1, 1, 1)
    return ((probs >= tau) & present[:, :, None, None]).to(probs.dtype)


def grow_mask(mask: torch.Tensor, cells: int, spare: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, w) binary mask -> the same grown by `cells` cells in every direction (8-neighbour dilation); an empty
    mask stays empty, so an image the gate left alone stays untouched. `spare` (B, h, w): cells the growth must not
    take (another concept's own cells: the mask's edge, not its neighbour); the mask's own cells all stay."""
    if cells <= 0:
        return mask
    grown = F.max_pool2d(mask[:, None].float(), 2 * cells + 1, stride=1, padding=cells)[:, 0]
    if spare is not None:
        grown = torch.maximum(mask.float(), grown * (~spare.bool()).float())
    return grown.to(mask.dtype)


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """DDIM's estimate of the clean latent from x_t and the predicted noise: (x_t - sqrt(1 - a) eps) / sqrt(a)."""
    a = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def renoise(x0: torch.Tensor, xi: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """The forward process q(x_t' | x0) with the given noise: sqrt(a) x0 + sqrt(1 - a) xi."""
    a = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    return a.sqrt() * x0 + (1 - a).sqrt() * xi


def classifier_scores(errors: torch.Tensor, temperature: float = CLASSIFIER_TEMPERATURE) -> torch.Tensor:
    """A diffusion classifier's presence scores (Li et al., "Your Diffusion Model is Secretly a Zero-Shot
    Classifier", ICCV 2023), as IRECE's gate reads them.

    errors (B, T', K + 1): the standard UNet's mean squared noise-prediction error on x0 re-noised at each of T'
    timesteps, under each of K concept prompts and, last, the null prompt. Each prompt's error is taken relative to
    the null prompt's (so images and timesteps that are simply easier or harder to denoise compare alike), the
    prompts compete in a softmax, and the shares are averaged over T'. Returns (B, K) scores in [0, 1]: a concept an
    image shows takes most of the mass, and two shown concepts share it."""
    rel = errors[..., :-1] / errors[..., -1:].clamp_min(1e-12)
    return torch.softmax(-temperature * rel, dim=-1).mean(1)


@dataclass(frozen=True)
class ScoreBounds:
    """The classifier gate's scores after `done` of its `total` t': each final score is the mean of one share in
    [0, 1] per t', so it still lies in [mean_so_far * done / total, (mean_so_far * done + total - done) / total].
    A decision against a bar is taken once both ends fall on the same side: then the mean so far decides it as the
    final score would. This is what lets an image that plainly shows a concept skip the remaining t' (on a request
    showing the concept, 1 of 3 passes), without changing any decision."""
    scores: torch.Tensor  # (B, K) mean presence score over the t' so far
    carried: torch.Tensor | None  # (B, K) mean conditioning score so far, or None
    done: int
    total: int

    def settled(self, mean: torch.Tensor, bar) -> torch.Tensor:
        """(B,) bool: the final score's side of `bar` (a float or (B,)) is already fixed."""
        low = mean * self.done / self.total
        high = (mean * self.done + (self.total - self.done)) / self.total
        return (low >= bar) == (high >= bar)


def conditioning_scores(eps_cond: torch.Tensor, eps_ref: torch.Tensor,
                        temperature: float = CONDITIONING_TEMPERATURE) -> torch.Tensor:
    """Which concept a request's conditioning carries, as the standard UNet reads it.

    eps_cond (B, T', C, H, W): its noise prediction under the request's own conditioning; eps_ref (B, T', K + 1, C,
    H, W): under each of the K concept prompts and, last, the null prompt, on the same inputs (the classifier gate's
    re-noised x0). The distance to each reference, relative to their mean, enters a softmax over the K concepts and
    the null prompt, averaged over T'. Returns (B, K): a conditioning that steers like "a star" gives star most of
    the mass whatever its tokens are (a learned embedding), an empty or unrelated one leaves it to the null prompt
    or to other concepts."""
    d = ((eps_ref - eps_cond[:, :, None]) ** 2).flatten(3).mean(3)  # (B, T', K + 1)
    rel = d / d.mean(-1, keepdim=True).clamp_min(1e-12)
    return torch.softmax(-temperature * rel, dim=-1)[..., :-1].mean(1)


# keep_others: a pixel goes to another concept only where that concept's probability also reaches this. Measured
# (UCE, G = 3; git history of BENCHMARKS.md): without it a single shape the head partly reads as another one kept some of its
# pixels (white-box inversions of the ten concepts, right aim: 8 -> 10 of 160 shown), with it 8; two shapes
# removed and kept, 480 scenes: 91.9% without, 90.8% at 0.1, 89.2% at 0.2 (keep_outside alone 86.3%).
KEEP_OTHERS_FLOOR = 0.1


def keep_pixels_outside(images: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
                        contest: torch.Tensor | None = None, floor: float = KEEP_OTHERS_FLOOR) -> torch.Tensor:
    """keep_outside, in pixels: (B, C, H, W) decoded images, the input latent's decode, (B, h, w) union mask ->
    the images with every pixel outside the mask (nearest-upsampled to the image) from the reference, in the images
    with a mask. The decoder reads neighbouring latent cells, so cells kept exactly beside a redrawn region can still
    decode differently (measured: a triangle beside a re-noised ring came out a star). An image without a mask (IRECE
    left it alone) is returned as it is. keep_others' `contest` (B, 1 + n, h, w) (head_contest): inside the mask too,
    a pixel where another concept's probability, bilinear to the image, beats the targets' and reaches `floor` comes
    from the reference: at 8x8 a target's cells share pixels with a shape beside it, and those are the other's."""
    mask = mask.to(images.device, images.dtype)
    keep = F.interpolate(mask[:, None], size=images.shape[-2:], mode="nearest") == 0
    if contest is not None and contest.shape[1] > 1:
        up = F.interpolate(contest.to(images.device, torch.float32), size=images.shape[-2:], mode="bilinear",
                           align_corners=False)
        other = up[:, 1:].amax(1, keepdim=True)
        keep = keep | ((other > up[:, :1]) & (other >= floor))
    masked = mask.flatten(1).amax(1) > 0
    return torch.where(masked[:, None, None, None] & keep, reference.to(images), images)


def head_contest(target: torch.Tensor, others: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """keep_others: (B, h, w) a target's concept-head probability, (B, n, h, w) the other concepts', (B, n) bool the
    others an image shows (score >= threshold) -> (B, 1 + n, h, w): the target's probability, then each shown
    other's, -1 for the others not shown (never kept). keep_pixels_outside upsamples each map apart. Several targets:
    their contests' maximum per cell (the others are the same in each) holds the targets' maximum, which keeps no
    more pixels than comparing each target pixel by pixel."""
    shown = torch.where(seen[:, :, None, None], others, torch.full_like(others, -1.0))
    return torch.cat([target[:, None], shown], 1)


def masked_images(mask: torch.Tensor) -> torch.Tensor:
    """(B, h, w) mask -> (B,) bool: the images with any masked cell."""
    return mask.flatten(1).amax(1) > 0


def steer_away(eps: torch.Tensor, eps_null: torch.Tensor, eps_concepts: torch.Tensor, mask: torch.Tensor,
               scale: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """negative_guidance: eps - scale * M * sum_c w_c (eps_c - eps_null), w_c: weights (B, n), 1 for each concept
    re-noised in that image (None: every concept in every image). eps (B, C, H, W): the loop's noise prediction
    (the erased UNet's) for images IRECE re-noised; eps_null (B, C, H, W) and eps_concepts (B, n, C, H, W): the
    standard UNet's under the null prompt and each re-noised concept's prompt; mask (B, H, W). The erased UNet
    refills the re-noised region from its surroundings and, where they still carry the concept (its colour, the
    edge of its cells), draws it again, erased or not (the standard model does the same, BENCHMARKS.md): the
    standard UNet still knows the concept, so its direction towards it says which way not to go. Outside the mask
    the prediction is unchanged."""
    delta = eps_concepts - eps_null[:, None]
    if weights is not None:
        delta = delta * weights.to(delta)[:, :, None, None, None]
    direction = delta.sum(1)
    return eps - scale * mask[:, None].to(eps) * direction


def perturb(x: torch.Tensor, mask: torch.Tensor, xi: torch.Tensor, mode: str = "replace") -> torch.Tensor:
    """x: (B, C, H, W) latent, mask: (B, H, W) in {0, 1}, xi ~ N(0, I) like x.

    The result is laid out in memory like x (the loop's latent comes out of the UNet channels_last): the UNet's
    kernels follow the layout, so a latent of equal values but another layout denoises to an image a pixel level
    apart, and an image IRECE leaves alone must come back bit-identical to IRECE off."""
    m = mask[:, None].to(x.dtype)
    if mode == "replace":
        # == (1 - M) * x + M * xi for binary M, and exactly x where M = 0
        return torch.where(m > 0, xi, x, out=torch.empty_like(x))
    if mode == "add":
        return torch.add(x, m * xi, out=torch.empty_like(x))
    raise ValueError(f"unknown perturbation mode {mode!r}")


def token_weights(prompt_ids: list[int], concept_ids: list[int], length: int = 77) -> torch.Tensor:
    """A (length,) weight vector that averages over the concept's tokens inside the prompt's token ids.

    prompt_ids include BOS; concept_ids are the concept word's BPE tokens (no BOS/EOS). Every occurrence
    counts. Raises if the concept does not occur in the prompt.
    """
    n = len(concept_ids)
    w = torch.zeros(length)
    for i in range(len(prompt_ids) - n + 1):
        if prompt_ids[i:i + n] == concept_ids:
            w[i:i + n] = 1.0
    if w.sum() == 0:
        raise ValueError(f"concept tokens {concept_ids} not found in localization prompt tokens {prompt_ids}")
    return w / w.sum()


@dataclass
class ConceptReport:
    concept: str
    mask_area: float  # fraction of latent cells in the mask
    peak: float  # the raw map's maximum (attention probability mass; NaN: no localizer ran, the gate said absent)
    intervened: bool
    score: float = float("nan")  # presence score of the concept at t* (NaN: no presence gate ran)
    threshold: float = float("nan")  # the gate's threshold for this concept (NaN: always intervene, the paper)
    conditioning_score: float = float("nan")  # how much the request's conditioning carries it (NaN: not asked)
    # (B,) bool: the batch's images its mask covers (None: all of them where intervened). Stays on the server like
    # the union mask: negative guidance steers each image away from its own concepts only.
    images: torch.Tensor | None = field(default=None, repr=False, compare=False, metadata={"wire": False})
    # keep_others: (B, 1 + n, h, w) head_contest, its and the shown other concepts' head probabilities (server side)
    contest: torch.Tensor | None = field(default=None, repr=False, compare=False, metadata={"wire": False})

    def covers(self, b: int) -> torch.Tensor:
        """(b,) bool: the images this concept was re-noised in."""
        if self.images is not None:
            return self.images.detach().to("cpu", torch.bool)
        return torch.full((b,), self.intervened)

    def to_dict(self) -> dict:
        """JSON form: NaN (no gate ran) becomes null, which strict JSON parsers accept."""
        def num(v: float) -> float | None:
            return None if math.isnan(v) else v
        return {"concept": self.concept, "mask_area": self.mask_area, "peak": num(self.peak),
                "intervened": self.intervened, "score": num(self.score), "threshold": num(self.threshold),
                "conditioning_score": num(self.conditioning_score)}


@dataclass
class IreceReport:
    step_index: int = -1
    timestep: int = -1
    concepts: list[ConceptReport] = field(default_factory=list)
    mask: torch.Tensor | None = None  # (B, H, W) union mask
    unconditioned: bool = False  # conditioning "null": some image's conditioning carried a target and was dropped
    # keep_others: the first look's head_contest, combined over its targets (the decode's keep_pixels_outside)
    contest: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # keep_outside: (B,) the images whose pixels outside the mask the decode takes from the input (stages.Keep)
    kept: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def intervened(self) -> bool:
        return any(c.intervened for c in self.concepts)

    @property
    def mask_area(self) -> float:
        return float(self.mask.mean()) if self.mask is not None else 0.0

    def merge(self, other: "IreceReport") -> "IreceReport":
        """Several intervention steps (tuned per-concept t*) make one report: first step, all concepts, union mask."""
        self.concepts += other.concepts
        self.mask = other.mask if self.mask is None else torch.maximum(self.mask, other.mask)
        self.unconditioned = self.unconditioned or other.unconditioned
        self.contest = other.contest if self.contest is None else self.contest  # the earliest look's
        return self

    def to_dict(self) -> dict:
        """The report's one JSON form (`irece generate --json`, the gRPC client, benchmarks)."""
        return {"intervened": self.intervened, "mask_area": self.mask_area, "step_index": self.step_index,
                "timestep": self.timestep, "unconditioned": self.unconditioned,
                "concepts": [c.to_dict() for c in self.concepts]}
