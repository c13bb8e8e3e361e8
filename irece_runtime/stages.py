"""The defence as stages on the denoising loop's step hook (diffusers' callbacks, k-diffusion's model wrappers): one
small object per mechanism, a policy's IreceConfig turned into an ordered list of them (`stages_for`), the loop
ignorant of every one.

    Keep      keep_outside: once an image was re-noised, outside its mask the latent follows the inversion's own
              trajectory and ends on the input's latent; the decode keeps the input's pixels there (and, keep_others,
              inside it where the head saw another concept beat the targets). Only where the request asks for its
              input back (no prompt of its own): a prompt asks for a change, and keeping the input undid it
    Look      at each planned step (t*, the rechecks): the gate's look (gates.look) gives the mask and the reports
    Perturb   the paper's re-noising of the mask: x*_t = (1 - M) x_t + M xi, xi seeded per request and step
    Steer     negative_guidance: the noise prediction steered away, inside the mask, from the concepts re-noised
    Condition conditioning "null": an image whose conditioning carries a target (the classifier reads it) or, under
              the head, whose learned embedding drew the target (the head saw it, or the classifier's reader found it
              in the embedding at the first look: the look then masks the whole image) loses its conditioning

A stage may act before each step (`on_step`, in list order), wrap the noise prediction (`wrap_eps`) and finish the
latent after the loop (`after_loop`); Keep's pixels are `keep_pixels`, which the decode applies from the report. All
of a request's stages share its `DefenceState`; `DefenceState.record` is the one place the report is built.
"""
from __future__ import annotations

import inspect
import time
from typing import Callable

import torch

from . import gates, irece
from .calls import Call, Machine

EpsSteps = Callable[[torch.Tensor, torch.Tensor], Machine]  # (x_t, t) -> a machine returning the predicted noise
# what the stages do, for caches of their results (benchmarks' cells): raised where a stage's behaviour changes
# under unchanged IreceConfig fields. 2: a learned embedding's images re-noised whole, its conditioning read (head)
REVISION = 2
PERTURB_SEED = 1_000_003  # the re-noising noise: seeded by the request's seed + this + the step index


class Conditioning:
    """A request's text conditioning (1 or B, 77, D), which the defence may take from some of its images mid-loop
    (IreceConfig.conditioning "null"): those rows are conditioned on `null` from then on. `learned`: it holds learned
    embedding vectors (a textual-inversion request), not only the tokenizer's words."""

    def __init__(self, cond: torch.Tensor, null: torch.Tensor, learned: bool = False):
        self.cond, self.null, self.learned = cond, null, learned
        self.dropped = False  # some image lost its conditioning

    def drop(self, rows: torch.Tensor) -> None:
        """rows: bool (B,) - these images' conditioning becomes the null conditioning. `dropped` says only what
        changed: a request already on the null prompt (an inverted latent) has nothing to lose."""
        cond = self.cond.expand(rows.shape[0], -1, -1)
        null = self.null.to(cond).expand_as(cond)
        changed = rows.to(cond.device) & (cond != null).flatten(1).any(1)
        self.cond = torch.where(rows[:, None, None].to(cond.device), null, cond)
        self.dropped = self.dropped or bool(changed.any())


class DefenceState:
    """One request's defence: its plan, what each image went through, the report."""

    def __init__(self, ctx: gates.Prompts, cfg: irece.IreceConfig, steps: int, seed: int,
                 conditioning: Conditioning | None = None, trajectory: list | None = None):
        self.ctx, self.cfg, self.seed, self.conditioning = ctx, cfg, seed, conditioning
        self.plan = cfg.plan(steps)  # step index -> [(concept, tau, threshold)]
        self.trajectory = trajectory  # the inversion's latents, input first (steps + 1), for Keep
        self.step = -1  # the loop's step index, as the hook last saw it
        self.look: gates.Look | None = None  # the look at this step (None: no look here)
        self.renoised_before: torch.Tensor | None = None  # (B,) re-noised at an earlier step, as of this look
        self.renoised_at: torch.Tensor | None = None  # (B,) the last step each image was re-noised at (-1: never)
        self.report: irece.IreceReport | None = None
        self.seconds = 0.0  # time in the looks and the re-noising

    @property
    def renoised(self) -> torch.Tensor | None:
        """(B,) images re-noised at a step so far (None: no look yet)."""
        return None if self.renoised_at is None else self.renoised_at >= 0

    def record(self, i: int, t: torch.Tensor, found: gates.Look) -> None:
        """A look at step i: which images it hits, and its part of the request's report (merged with earlier
        looks': first step, every concept, union mask, the earliest look's contest)."""
        hit = irece.masked_images(found.mask)
        self.renoised_before = self.renoised
        at = torch.full(hit.shape, -1, dtype=torch.long, device=hit.device) if self.renoised_at is None \
            else self.renoised_at
        self.renoised_at = torch.where(hit, i, at)
        contests = [c.contest for c in found.concepts if c.contest is not None]
        step = irece.IreceReport(i, int(t), found.concepts, found.mask,
                                 unconditioned=self.conditioning is not None and self.conditioning.dropped,
                                 contest=torch.stack(contests).amax(0) if contests else None)
        self.report = step if self.report is None else self.report.merge(step)
        self.look = found


class Stage:
    """A mechanism on the step hook; each method leaves the request alone unless the stage overrides it."""

    def on_step(self, state: DefenceState, i: int, t: torch.Tensor, x: torch.Tensor) -> "torch.Tensor | Machine":
        return x

    def wrap_eps(self, state: DefenceState, eps: EpsSteps) -> EpsSteps:
        return eps

    def after_loop(self, state: DefenceState, x: torch.Tensor) -> torch.Tensor:
        return x


class Keep(Stage):
    """keep_outside (and keep_others): only IRECE's mask is redrawn in the images it re-noised, where the request
    regenerates its input without a prompt of its own. With a prompt (an edit) the erased model redraws the whole
    image; keeping the input outside the mask kept the erased concept's edge cells there too (UCE, inverted star
    renders regenerated with "an image of a star": 0 of 16 show star alone, 2 and 5 of 16 with keep, white / black
    box)."""
    needs_trajectory = True

    @staticmethod
    def kept(state) -> torch.Tensor | None:
        """(B,) bool: the images re-noised whose conditioning is the null one (they ask for their input back)."""
        if state.trajectory is None or state.renoised is None or not state.renoised.any():
            return None
        c = state.conditioning
        b = state.renoised.shape[0]
        plain = (c.cond.expand(b, -1, -1) == c.null.to(c.cond).expand(b, -1, -1)).flatten(1).all(1) \
            if c is not None else torch.ones(b, dtype=torch.bool)
        return state.renoised & plain.to(state.renoised.device)

    def on_step(self, state, i, t, x):
        """The latent outside the union mask so far becomes the inversion's at the level of step i (step n: the
        input's latent)."""
        rows = self.kept(state)
        if rows is None or not rows.any():
            return x
        level = state.trajectory[len(state.trajectory) - 1 - i].to(x)
        m = state.report.mask.to(x)[:, None]
        return torch.where(rows[:, None, None, None].to(x.device), m * x + (1 - m) * level, x)

    def after_loop(self, state, x):
        if state.report is not None:  # the decode keeps these images' pixels (keep_pixels)
            state.report.kept = self.kept(state)
        return self.on_step(state, len(state.trajectory) - 1, None, x) if state.trajectory is not None else x


def keep_pixels(decoded: torch.Tensor, report: irece.IreceReport | None, trajectory: list | None) -> Machine:
    """keep_outside in pixels: where the report has a mask, the pixels outside it (and, with its contest, the other
    concepts' inside it) are the input latent's own decode (irece.keep_pixels_outside): the decoder reads
    neighbouring latent cells, so kept cells beside a redrawn region would otherwise decode differently."""
    if trajectory and report is not None and report.mask is not None and report.kept is not None \
            and bool(report.kept.any()):
        reference = yield Call("vae_decode", (trajectory[0].to(decoded),))  # the input's own latent
        mask = report.mask * report.kept.to(report.mask.device)[:, None, None]  # an image not kept: as decoded
        decoded = irece.keep_pixels_outside(decoded, reference, mask, report.contest)
    return decoded


class Look(Stage):
    """At each planned step, the gate's look at x_t (its mask and reports), recorded in the state."""

    def on_step(self, state, i, t, x):
        state.look = None
        if i not in state.plan:
            return x
        return self._look(state, i, t, x)

    def _look(self, state, i, t, x) -> Machine:
        t0 = time.perf_counter()
        c = state.conditioning
        learned = c is not None and c.learned and state.cfg.conditioning == "null"
        reads = c is not None and gates.reads_conditioning(state.cfg, c.learned, first=i == min(state.plan))
        found = yield from gates.look(state.ctx, x, t, state.cfg, state.plan[i], c.cond if reads else None, learned)
        state.record(i, t, found)
        state.seconds += time.perf_counter() - t0
        return x


class Perturb(Stage):
    """The paper's re-noising of the look's mask."""

    def on_step(self, state, i, t, x):
        if state.look is None:
            return x
        t0 = time.perf_counter()
        # noise seeded per request and step: the same request gives the same image alone or beside others
        xi = torch.randn(x.shape, generator=torch.Generator().manual_seed((state.seed + PERTURB_SEED + i) % 2**63))
        x = irece.perturb(x, state.look.mask.to(x), xi.to(x), state.cfg.mode)
        state.seconds += time.perf_counter() - t0
        return x


class Condition(Stage):
    """conditioning "null": the images whose conditioning would redraw a target lose it from this step on."""

    def on_step(self, state, i, t, x):
        if state.look is None or state.conditioning is None:
            return x
        hit = irece.masked_images(state.look.mask)
        if state.look.carried is not None:
            # the classifier reads the conditioning itself; and wherever the target came back after a re-noising
            rows = state.look.carried.to(hit.device)
            if state.renoised_before is not None:
                rows = rows | (hit & state.renoised_before)
        elif state.conditioning.learned:
            # the head: where it saw a target or read it in the embedding (its mask is then the whole image), the
            # learned embedding that drew it would redraw it.
            # A text prompt is what the erasure was trained against, and keeps working through it (UCE: dropping
            # "an image of a star" from an inverted star let the star back in 4 of 16 images, against 0 kept)
            rows = hit
        else:
            return x
        if rows.any():
            state.conditioning.drop(rows)
            state.report.unconditioned = state.report.unconditioned or state.conditioning.dropped
        return x


class Steer(Stage):
    """negative_guidance: in the images re-noised, inside the mask, the prediction steered away from the concepts
    re-noised in each (irece.steer_away) with the standard UNet (1 + n rows per such image and step: the null prompt,
    each concept's localization prompt); with negative_guidance_steps K, only in the K steps from the last
    re-noising; with negative_guidance_every E, those rows are computed every E steps and reused between, afresh
    wherever the rows, their concepts or their last re-noising changed. Images left alone (or past their K steps)
    keep the loop's own prediction, bit for bit."""

    def wrap_eps(self, state, eps):
        cfg, prompts = state.cfg, {}  # re-noised concepts -> [null; their prompts] hidden states
        last = {}  # the standard UNet's rows as last computed: "key" (what they were computed for), "step", "out"

        def steered(x, t):
            e = yield from eps(x, t)
            if state.renoised is None or not state.renoised.any():
                return e
            rows_of = state.renoised
            if cfg.negative_guidance_steps:
                rows_of = rows_of & (state.step - state.renoised_at < cfg.negative_guidance_steps)
                if not rows_of.any():
                    return e
            b = x.shape[0]
            covers: dict[str, torch.Tensor] = {}  # concept -> (B,) the images it was re-noised in, over all steps
            for c in state.report.concepts:
                if c.intervened:
                    covers[c.concept] = covers.get(c.concept, torch.zeros(b, dtype=torch.bool)) | c.covers(b)
            concepts = tuple(covers)
            if concepts not in prompts:  # the set changes only where IRECE intervenes, not every step
                prompts[concepts] = torch.cat([state.ctx.null_hidden] + [state.ctx.localization(c, cfg.template)[0]
                                                                         for c in concepts])
            hidden = prompts[concepts]
            rows = rows_of.nonzero()[:, 0].to(x.device)
            n = hidden.shape[0]
            key = (concepts, tuple(rows.tolist()), tuple(state.renoised_at[rows.to(state.renoised_at.device)].tolist()))
            if last.get("key") == key and 0 < state.step - last["step"] < cfg.negative_guidance_every:
                out = last["out"]
            else:
                out = yield Call("eps", (x[rows].repeat_interleave(n, 0), hidden.repeat(len(rows), 1, 1)), t,
                                 "standard")
                out = out.view(len(rows), n, *out.shape[1:]).to(e)
                last.update(key=key, step=state.step, out=out)
            e = e.clone()
            weights = torch.stack([covers[c] for c in concepts], 1)[rows.cpu()]  # (rows, n)
            e[rows] = irece.steer_away(e[rows], out[:, 0], out[:, 1:], state.report.mask.to(e.device)[rows],
                                       cfg.negative_guidance, weights)
            return e
        return steered


def stages_for(cfg: irece.IreceConfig) -> list[Stage]:
    """The policy's stages in the order they act at a step: keep (on the latent a look will see), look, perturb,
    condition; steer wraps the noise prediction."""
    out: list[Stage] = [Keep()] if cfg.keep_outside else []
    out += [Look(), Perturb()]
    if cfg.conditioning == "null":
        out.append(Condition())
    if cfg.negative_guidance:
        out.append(Steer())
    return out


def needs_trajectory(cfg: irece.IreceConfig | None) -> bool:
    """Whether the policy's stages read an inverted request's inversion trajectory."""
    return cfg is not None and any(getattr(s, "needs_trajectory", False) for s in stages_for(cfg))


class Defence:
    """A request's stages over one state: the loop's step hook, its noise-prediction wrapper, its last word on the
    latent."""

    def __init__(self, ctx: gates.Prompts, cfg: irece.IreceConfig, steps: int, seed: int,
                 conditioning: Conditioning | None = None, trajectory: list | None = None):
        if trajectory is not None and len(trajectory) != steps + 1:
            raise ValueError(f"keep_outside needs the inversion's {steps + 1} latents for {steps} steps, got "
                             f"{len(trajectory)}: invert and denoise with the same number of steps")
        self.stages = stages_for(cfg)
        self.state = DefenceState(ctx, cfg, steps, seed, conditioning, trajectory)

    @property
    def report(self) -> irece.IreceReport | None:
        return self.state.report

    def __call__(self, i: int, t: torch.Tensor, x: torch.Tensor) -> Machine:
        self.state.step = i
        for stage in self.stages:
            x = stage.on_step(self.state, i, t, x)
            if inspect.isgenerator(x):
                x = yield from x
        return x

    def wrap_eps(self, eps: EpsSteps) -> EpsSteps:
        for stage in self.stages:
            eps = stage.wrap_eps(self.state, eps)
        return eps

    def after_loop(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage.after_loop(self.state, x)
        return x
