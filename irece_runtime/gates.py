"""IRECE's looks: at a planned step, where each target concept is in x_t (its mask) and whether to re-noise it.

    "off"         the paper: each concept's own localization prompt, min-max of its cross-attention map >= tau,
                  in every image (no presence gate)
    "head"        the model's concept head on the standard UNet's features (one row an image): a concept whose most
                  confident cell reaches its threshold is masked where its probability reaches tau
    "classifier"  a diffusion classifier (the standard UNet's denoising error under each concept's prompt) says which
                  images show a target; there the paper's masks are taken. It also reads the request's conditioning
                  (`carried`): does it steer like a target's prompt?

A look is a machine (calls.Call in, results out) over the backend's calls and the model's prompts (`Prompts`: the
Pipeline provides them), never the Pipeline itself. Every look returns a `Look`; one function builds its reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from . import irece
from .calls import Call, Machine

CLASSIFIER_SEED = 20_231_002  # the diffusion-classifier gate's fixed re-noising noise (seed + index of t')


class Prompts(Protocol):
    """What a look needs of the model's text side (Pipeline implements it)."""
    head_concepts: tuple[str, ...]
    vocabulary: tuple[str, ...]
    null_hidden: torch.Tensor
    alphas_cumprod: torch.Tensor

    def localization(self, concept: str, template: str) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode_prompt(self, prompt: str) -> torch.Tensor: ...

    def memo(self, key, make: Callable): ...  # make()'s result, computed once per key (prompts' hidden states)


@dataclass
class Look:
    mask: torch.Tensor  # (B, h, w) union mask over the targets (grown by cfg.grow)
    concepts: list[irece.ConceptReport]
    carried: torch.Tensor | None = None  # (B,) bool: the request's conditioning carries a target (classifier only)


def report(concept: str, mask: torch.Tensor | None, peak: float = float("nan"), score: float = float("nan"),
           threshold: float = float("nan"), conditioning_score: float = float("nan"),
           contest: torch.Tensor | None = None) -> irece.ConceptReport:
    """One target's ConceptReport from its (B, h, w) mask (None: the gate said absent everywhere)."""
    if mask is None:
        return irece.ConceptReport(concept, 0.0, peak, False, score, threshold, conditioning_score)
    return irece.ConceptReport(concept, float(mask.mean()), peak, bool(mask.any()), score, threshold,
                               conditioning_score, images=irece.masked_images(mask), contest=contest)


def reads_conditioning(cfg: irece.IreceConfig, learned: bool = False, first: bool = True) -> bool:
    """Whether cfg's look reads the request's conditioning (conditioning "null": the classifier's at every look; the
    head's only a learned embedding's, at the `first` look - one classifier pass a request; a text prompt is what the
    erasure was trained against)."""
    return cfg.conditioning == "null" and (cfg.gate == "classifier" or (cfg.gate == "head" and learned and first))


def conditioning_bar(cfg: irece.IreceConfig, shown: torch.Tensor) -> torch.Tensor:
    """The conditioning score from which a conditioning counts as carrying a target: lower in an image the gate says
    shows the target (cfg.conditioning_threshold_shown) than elsewhere (cfg.conditioning_threshold)."""
    return torch.where(shown, cfg.conditioning_threshold_shown, cfg.conditioning_threshold)


def look(ctx: Prompts, x, t, cfg: irece.IreceConfig, targets, cond: torch.Tensor | None = None,
         learned: bool = False) -> Machine:
    """The union mask and reports of `targets` [(concept, tau, threshold)] at x_t under cfg's gate; `cond` (1 or B,
    77, D): the request's conditioning, which the gate reads with cfg.conditioning "null" (reads_conditioning);
    `learned`: it is a learned embedding's, whose images the head takes whole (head_look). A non-finite x_t or map
    fails closed (fail_closed)."""
    if not torch.isfinite(x).all():
        return fail_closed(x, cfg, targets, "latent")
    if cfg.gate == "head":
        return (yield from head_look(ctx, x, t, cfg, targets, cond, learned))
    if cfg.gate == "classifier":
        found = yield from classifier_look(ctx, x, t, cfg, targets, cond)
    else:
        masks, peaks, _ = yield from concept_maps(ctx, x, t, cfg, targets)
        if masks is None:
            return fail_closed(x, cfg, targets, "concept map")
        found = Look(masks.amax(0), [report(c, masks[i], float(peaks[i].max())) for i, (c, _, _) in enumerate(targets)])
    found.mask = irece.grow_mask(found.mask, cfg.grow)
    return found


def check(ctx: Prompts, cfg: irece.IreceConfig) -> None:
    """Refuse a gate that cannot tell presence on this model, naming the fix, instead of a silent always-on: the
    classifier's softmax over a single concept scores 1.0 for every image; the head gate needs a head that knows
    every target."""
    if cfg.gate == "classifier" and len(contrast_set(ctx, cfg)) < 2:
        raise ValueError("gate 'classifier': its softmax over one concept scores 1.0 for every image (always on); give "
                         "it competing concepts (the model folder's concepts.json or the `vocabulary` setting), or use "
                         "the concept head (`irece calibrate` after training one)")
    if cfg.gate == "head":
        if not ctx.head_concepts:
            raise ValueError("gate 'head': this model folder has no concept_head/ (train one: `irece head train --model M "
                             "--concepts ...`; "
                             "then `irece calibrate --model M`)")
        head_columns(ctx, cfg.concepts)


def fail_closed(x: torch.Tensor, cfg: irece.IreceConfig, targets: list, what: str) -> Look:
    """A NaN/inf latent or map cannot be localized: refuse the request (nonfinite="error"), or mask the whole latent
    (nonfinite="full_mask"; in "replace" mode x_t* becomes fresh noise). Never an empty mask."""
    if cfg.nonfinite == "error":
        raise irece.NonFiniteError(f"IRECE cannot localize: the {what} at t* is not finite")
    mask = torch.ones(x.shape[0], *x.shape[2:], dtype=torch.float32, device=x.device)
    return Look(mask, [irece.ConceptReport(c, 1.0, float("nan"), True) for c, _, _ in targets])


# -- the paper's maps --------------------------------------------------------------------------------------------
def concept_maps(ctx: Prompts, x, t, cfg: irece.IreceConfig, targets) -> Machine:
    """The paper's masks: each target's own localization prompt, min-max of its map >= its tau. Returns masks
    (n, B, h, w), peaks (n, B) and the raw maps (n, B, h, w), or (None, None, None) where a map is not finite."""
    b = x.shape[0]
    hidden, weights = zip(*(ctx.localization(c, cfg.template) for c, _, _ in targets))
    n = len(targets)
    maps = yield Call("concept_map", (x.repeat(n, 1, 1, 1), torch.cat(hidden).repeat_interleave(b, 0),
                                      torch.cat(weights).repeat_interleave(b, 0)), t)
    if not torch.isfinite(maps).all():
        return None, None, None
    maps = maps.view(n, b, *maps.shape[1:])
    masks = torch.stack([irece.concept_mask(maps[i], tau) for i, (_, tau, _) in enumerate(targets)])
    return masks, maps.flatten(2).max(2).values, maps


# -- the concept head --------------------------------------------------------------------------------------------
def head_columns(ctx: Prompts, concepts) -> list[int]:
    """The concept head's output index of each concept; a concept it was not trained on cannot be gated."""
    missing = [c for c in concepts if c not in ctx.head_concepts]
    if missing:
        raise ValueError(f"gate 'head': the model's concept head has no output for {missing[0]!r}"
                         + ("" if ctx.head_concepts else " (this model folder has no concept_head/)"))
    return [ctx.head_concepts.index(c) for c in concepts]


def head_steps(ctx: Prompts, x, t) -> Machine:
    """(B, K_head, h, w) concept probabilities at x_t: one standard-UNet row per image, null prompt."""
    return (yield Call("concept_head", (x, ctx.null_hidden.expand(x.shape[0], -1, -1)), t))


def head_look(ctx: Prompts, x, t, cfg: irece.IreceConfig, targets, cond: torch.Tensor | None = None,
              learned: bool = False) -> Machine:
    """Each target's presence score is its most confident cell; where it reaches the target's threshold, the
    target's own cells (probability >= its tau) are its mask. Where no target passes, x_t is left exactly as it was.
    The union mask grows by cfg.grow cells, but not into cells where the head sees a concept that is not a target
    (probability >= cfg.tau): a neighbouring shape is not the mask's edge. With keep_others, each report carries the
    contest (irece.head_contest) of its target against the other concepts the image shows.

    A learned embedding (`learned`, conditioning "null") that drew a target gets no image of its own: the target's
    mask is the whole image wherever the head sees it, and - with `cond`, its conditioning - wherever the diffusion
    classifier's reader says the embedding steers like the target's prompt (presence_steps' conditioning scores
    against cfg.conditioning_threshold, or cfg.conditioning_threshold_shown where the head sees the target). Edge
    cells left outside the head's mask redrew the shape, and the head misses some embeddings' shapes at every look;
    each half alone left most of them (UCE white-box TI under the policy, `irece bench policy`: 16% with the head's
    masks, 4% with both halves; BENCHMARKS.md)."""
    columns = head_columns(ctx, [c for c, _, _ in targets])
    every = yield from head_steps(ctx, x, t)
    if not torch.isfinite(every).all():
        return fail_closed(x, cfg, targets, "concept head's output")
    probs = every[:, columns].float()
    others = [k for k in range(every.shape[1]) if k not in columns]
    spare = (every[:, others] >= cfg.tau).any(1) if others and cfg.grow else None
    scores = irece.head_scores(probs)
    thresholds = torch.tensor([thr for _, _, thr in targets], dtype=scores.dtype, device=scores.device)
    present = scores >= thresholds
    masks = irece.head_masks(probs, torch.tensor([tau for _, tau, _ in targets]), present)
    read = None
    if learned:
        whole = present
        if cond is not None:
            read = yield from learned_reader(ctx, x, t, cfg, [c for c, _, _ in targets], cond, present)
            if read is None:
                return fail_closed(x, cfg, targets, "conditioning score")
            whole = whole | (read >= conditioning_bar(cfg, present))
        masks = torch.where(whole[:, :, None, None], torch.ones_like(masks), masks)
    if cfg.keep_others:  # the others an image shows, by the head's score against the request's threshold
        rest = every[:, others].float()
        seen = irece.head_scores(rest) >= cfg.threshold
    concepts = [report(c, masks[:, i], float(probs[:, i].max()), float(scores[:, i].max()), thr,
                       float(read[:, i].max()) if read is not None else float("nan"),
                       contest=irece.head_contest(probs[:, i], rest, seen) if cfg.keep_others else None)
                for i, (c, _, thr) in enumerate(targets)]
    return Look(irece.grow_mask(masks.amax(1).to(torch.float32), cfg.grow, spare), concepts)


def learned_reader(ctx: Prompts, x, t, cfg: irece.IreceConfig, concepts: list[str], cond: torch.Tensor,
                   present: torch.Tensor) -> Machine:
    """(B, n) conditioning scores of `concepts` for a learned embedding's conditioning `cond` (presence_steps'
    reader, stopping as soon as each is settled against its bar), or None where one is not finite."""
    index = contrast_set(ctx, cfg)
    cols = [index.index(c) for c in concepts]
    bar = conditioning_bar(cfg, present)

    def decided(b: irece.ScoreBounds) -> bool:
        return bool(b.settled(b.carried[:, cols], bar).all())

    _, read = yield from presence_steps(ctx, x, t, cfg, cond, decided if cfg.classifier_early_exit else None)
    return read[:, cols] if torch.isfinite(read).all() else None


# -- the diffusion classifier ------------------------------------------------------------------------------------
def contrast_set(ctx: Prompts, cfg: irece.IreceConfig) -> tuple[str, ...]:
    """The concepts the classifier weighs: the operator's, then the configured vocabulary, then the model folder's
    own concepts.json (if any), each once."""
    return tuple(dict.fromkeys(tuple(cfg.concepts) + tuple(cfg.vocabulary) + ctx.vocabulary))


def classifier_prompts(ctx: Prompts, concepts: tuple[str, ...]) -> torch.Tensor:
    """(K + 1, 77, D) hidden states of "a c" for each concept, then of the null prompt (computed once)."""
    return ctx.memo(("classifier", concepts),
                    lambda: torch.cat([ctx.encode_prompt(f"a {c}") for c in concepts] + [ctx.null_hidden]))


def presence_steps(ctx: Prompts, x, t, cfg: irece.IreceConfig, cond: torch.Tensor | None = None,
                   decided: Callable | None = None) -> Machine:
    """(B, K) diffusion-classifier presence scores of the contrast set's concepts at x_t, from the standard UNet:
    x0 predicted with the null prompt (one row per image), re-noised at each t' in cfg.classifier_timesteps with
    fixed noise (the same for every request, so a request's score does not depend on its batch), and denoised under
    each concept's prompt and the null prompt (K + 1 rows per image and t', one call per t'). With the request's
    conditioning `cond` (1 or B, 77, D), the UNet(s) of cfg.conditioning_unet also denoise under it (the standard
    one: one more row per image in the same call; the erased one: its own call), and the machine returns (scores,
    conditioning scores (B, K)) (irece.conditioning_scores; "both": the higher of the two); else (scores, None).

    `decided(bounds)` (the gate's decision rule) lets the machine stop before the last t': after each t' it gets
    irece.ScoreBounds, the range the final scores can still reach, and where it says every decision is already
    taken, the machine returns the mean over the t' it ran (which decides as the final scores would)."""
    hidden = classifier_prompts(ctx, contrast_set(ctx, cfg))
    b, k1 = x.shape[0], hidden.shape[0]
    alphas = ctx.alphas_cumprod
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
            eps_ref.append(ref.view(b, k1, *ref.shape[1:]))
        if "standard" in readers:
            eps_cond["standard"].append(eps[b * k1:])
        if "erased" in readers:  # the model that draws, under the same conditioning
            eps_cond["erased"].append((yield Call("eps", (x_tp, cond_b), torch.tensor(t_prime), "erased")))
        done, total = j + 1, len(cfg.classifier_timesteps)
        if decided is not None and done < total:
            partial = _scores_so_far(errors, eps_ref, eps_cond, readers)
            if decided(irece.ScoreBounds(*partial, done, total)):
                return partial
    return _scores_so_far(errors, eps_ref, eps_cond, readers)


def _scores_so_far(errors, eps_ref, eps_cond, readers):
    """(scores, conditioning scores or None), each the mean over the t' computed so far."""
    scores = irece.classifier_scores(torch.stack(errors, 1))
    if not readers:
        return scores, None
    ref = torch.stack(eps_ref, 1)
    return scores, torch.stack([irece.conditioning_scores(torch.stack(eps_cond[r], 1), ref)
                                for r in readers]).amax(0)


def classifier_look(ctx: Prompts, x, t, cfg: irece.IreceConfig, targets, cond=None) -> Machine:
    """Score every concept of the contrast set; only targets whose score reaches their threshold are localized (the
    paper's masks), and only in the images that show them. Where no target passes, no localizer call runs and x_t
    is left exactly as it was. With `cond`, the request's conditioning is scored in the same calls: `carried` says
    the images where it carries a target (its score reaches cfg.conditioning_threshold; in an image that shows the
    target, cfg.conditioning_threshold_shown), whether or not the image shows the target yet."""
    concepts = contrast_set(ctx, cfg)
    bars = [(concepts.index(c), thr) for c, _, thr in targets]  # each target's column and presence threshold

    def decided(b: irece.ScoreBounds) -> bool:
        """Every decision below is taken: each target shown or not, its conditioning carried or not."""
        for k, thr in bars:
            if not b.settled(b.scores[:, k], thr).all():
                return False
            if b.carried is not None and \
                    not b.settled(b.carried[:, k], conditioning_bar(cfg, b.scores[:, k] >= thr)).all():
                return False
        return True

    scores, carried = yield from presence_steps(ctx, x, t, cfg, cond, decided if cfg.classifier_early_exit else None)
    if not torch.isfinite(scores).all() or (carried is not None and not torch.isfinite(carried).all()):
        return fail_closed(x, cfg, targets, "presence score")
    rows = None
    if carried is not None:
        rows = torch.stack([carried[:, k] >= conditioning_bar(cfg, scores[:, k] >= thr) for k, thr in bars]).any(0)
    present = {c: scores[:, concepts.index(c)] >= thr for c, _, thr in targets}
    hit = [tg for tg in targets if present[tg[0]].any()]
    masks, peaks = {}, {}
    if hit:
        m, p, _ = yield from concept_maps(ctx, x, t, cfg, hit)
        if m is None:
            return fail_closed(x, cfg, targets, "concept map")
        for i, (c, _, _) in enumerate(hit):
            masks[c] = m[i] * present[c][:, None, None].to(m.dtype)
            peaks[c] = float(p[i].max())
    union = torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.float32, device=x.device)
    for mask in masks.values():
        union = torch.maximum(union, mask.to(union))
    concepts_out = [report(c, masks.get(c), peaks.get(c, float("nan")), float(scores[:, concepts.index(c)].max()), thr,
                           float(carried[:, concepts.index(c)].max()) if carried is not None else float("nan"))
                    for c, _, thr in targets]
    return Look(union, concepts_out, rows)
