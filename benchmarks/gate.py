"""`irece bench gate`: what a presence gate changes, on Shapes-10 (issue: concept-aware IRECE).

- wrong-concept control: white-box DDIM inversion of renders of the erased concept, null prompt, on every
  erasure method: IRECE aimed at the right concept should remove it; aimed at a wrong one, leave it;
- benign requests: with the erased concept as the operator's, requests showing other concepts (text prompts and
  inverted renders) should come back bit-identical to IRECE off;
- two-shape scenes: IRECE aimed at one shape of a pair (standard model, inverted render, null prompt) should
  remove that shape and keep the other, changing little outside its mask (PSNR).
Every figure is given for the gate on (the diffusion classifier) and off (the paper's always-intervene); the
wrong-concept control also for the full defence.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from irece_runtime.irece import PRESENCE_GATE, RECHECK, IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld import shapes
from miniworld.judge import load_judge, presence, shows
from miniworld.prompts import concept_prompts

from . import batch as gen
from .crr import PAPER_IRECE, BenchSettings, erased_unet, inverted, outside_mask_change

# the wrong-concept control's defences, as in the CRR table (crr.defence_config): the paper's IRECE, the gate, and
# the full defence (the gate, the conditioning defence and the later looks)
CONTROL_DEFENCES = {"irece-paper": PAPER_IRECE, "irece-gated": {"gate": PRESENCE_GATE},
                    "full": {"gate": PRESENCE_GATE, "conditioning": "null", "recheck": RECHECK}}


def control_defences(gate: str) -> dict:
    """CONTROL_DEFENCES with `gate` as the presence gate; the full defence only where it is the classifier (the
    conditioning defence scores with the classifier's calls); for another gate, the gate with the full defence's
    later looks (RECHECK) instead."""
    if gate == PRESENCE_GATE:
        return CONTROL_DEFENCES
    return {"irece-paper": PAPER_IRECE, "irece-gated": {"gate": gate},
            "gated+recheck": {"gate": gate, "recheck": RECHECK}}
PARTS = ("wrong_concept", "benign", "pairs")
PAIR_SEED = 7_300_000


def wrong_concept(pipe_for, judge, model_dir, concept: str, wrong: str, methods, s: BenchSettings,
                  cfg: IreceConfig) -> list[dict]:
    rows = []
    for method in methods:
        erased = erased_unet(model_dir, method, concept, s)
        pipe = pipe_for(erased)
        x_T = inverted(pipe, model_dir, erased, concept, "erased", False, s)
        for defence, options in control_defences(cfg.gate).items():
            for aim in (concept, wrong):
                c = replace(cfg, concepts=(aim,), **options)
                imgs, masks = gen.from_latents(pipe, x_T, "", c, seed=s.seed, steps=s.steps, guidance=s.guidance)
                # intervened: the share of images IRECE re-noised (a gate's misses are the rest)
                touched = np.zeros(len(imgs), bool) if masks is None else masks.reshape(len(imgs), -1).any(1)
                rows.append({"method": method, "concept": concept, "aimed_at": aim, "defence": defence,
                             "gate": c.gate, "n": len(imgs), "crr": float(shows(judge, imgs, concept).mean()),
                             "intervened": float(touched.mean())})
    return rows


def benign(pipe, concept: str, others: list[str], s: BenchSettings, cfg: IreceConfig) -> list[dict]:
    """Share of requests showing another concept whose image is bit-identical with the operator's IRECE on."""
    rows = []
    for gate in ("off", cfg.gate):
        c = replace(cfg, concepts=(concept,), gate=gate)
        same_text, same_inv, n = 0, 0, 0
        for o in others:
            prompts = concept_prompts(o, s.n, s.seed + 11)
            seeds = [s.seed + 1000 * shapes.CONCEPTS.index(o) + k for k in range(s.n)]
            off, _ = gen.from_prompts(pipe, prompts, seeds, None, steps=s.steps, guidance=s.guidance)
            on, _ = gen.from_prompts(pipe, prompts, seeds, c, steps=s.steps, guidance=s.guidance)
            same_text += int(sum(np.array_equal(a, b) for a, b in zip(off, on)))
            refs = np.stack([shapes.render(o, seed=s.seed + 77 + k).image for k in range(s.n)])
            x_T = gen.invert_images(pipe, refs, "erased", s.steps)
            off, _ = gen.from_latents(pipe, x_T, "", None, seed=s.seed, steps=s.steps, guidance=s.guidance)
            on, _ = gen.from_latents(pipe, x_T, "", c, seed=s.seed, steps=s.steps, guidance=s.guidance)
            same_inv += int(sum(np.array_equal(a, b) for a, b in zip(off, on)))
            n += s.n
        rows.append({"concept": concept, "gate": gate, "n_text": n, "n_inverted": n,
                     "identical_text": same_text / n, "identical_inverted": same_inv / n})
    return rows


# two-shape scenes: the paper's IRECE, the gate, and the gate's options that look again later in the schedule
# (recheck) and keep what lies outside the mask (keep_outside; with the head, keep_others too)
def pair_variants(gate: str) -> dict:
    """The two-shape scenes' variants of `gate`; keep_others only where it is the concept head."""
    return {"off": PAPER_IRECE, gate: {}, "recheck": {"recheck": RECHECK},
            "keep": {"keep_outside": True}, "recheck+keep": {"recheck": RECHECK, "keep_outside": True},
            **({"recheck+keep+others": {"recheck": RECHECK, "keep_outside": True, "keep_others": True}}
               if gate == "head" else {})}


def pairs(pipe, judge, n: int, s: BenchSettings, cfg: IreceConfig, variants=None, erased_for=None,
          configs: dict | None = None) -> list[dict]:
    """Two-shape renders, inverted with the standard model and regenerated (null prompt) with IRECE aimed at
    one of the shapes: target removed, other kept, PSNR outside the mask; a row per variant (pair_variants).
    The denoising after t* runs on `pipe`'s erased UNet (the standard one for load_pipeline(model, None): the
    strictest case, nothing but IRECE keeps the target away), or with erased_for(target) -> pipeline, on a model
    that erased the target (the product's case: IRECE, then the erased UNet). `configs` (variant -> IreceConfig,
    e.g. named policies): the variants instead of pair_variants(cfg.gate)."""
    rng = np.random.default_rng(PAIR_SEED + s.seed)
    scenes = [shapes.render_scene(2, rng=rng) for _ in range(n)]
    trajectory = []
    x_T = gen.invert_images(pipe, np.stack([sc.image for sc in scenes]), "standard", s.steps, trajectory=trajectory)
    if erased_for is None:
        pipe_of = lambda target: pipe  # noqa: E731
        off, _ = gen.from_latents(pipe, x_T, "", None, seed=s.seed, steps=s.steps, guidance=s.guidance)
    else:  # each scene on the model that erased its target
        pipe_of = erased_for
        off = np.concatenate([gen.from_latents(pipe_of(sc.shapes[0].concept), x_T[k:k + 1], "", None, seed=s.seed,
                                               steps=s.steps, guidance=s.guidance)[0]
                              for k, sc in enumerate(scenes)])
    # IRECE off: how often the inversion alone brings both shapes back (the ceiling of removed-and-kept is the share
    # where the other one comes back), and how often it loses the target by itself
    seen = presence(judge, off) >= 0.5  # (n, concepts): what shows() reads, for all images in one call
    t_off, o_off = (np.array([seen[k, shapes.CONCEPTS.index(sc.shapes[j].concept)] for k, sc in enumerate(scenes)])
                    for j in (0, 1))
    rows = [{"variant": "none", "gate": "none", "n": n, "target_removed": float(np.mean(~t_off)),
             "other_kept": float(np.mean(o_off)), "removed_and_kept": float(np.mean(~t_off & o_off)),
             "both_shown": float(np.mean(t_off & o_off)), "intervened": 0.0, "psnr_outside_mask_db": float("nan")}]
    options = pair_variants(cfg.gate) if configs is None else configs
    for variant in variants or tuple(options):
        removed, kept, both, psnrs, intervened = [], [], [], [], 0
        for k, sc in enumerate(scenes):
            target, other = sc.shapes[0].concept, sc.shapes[1].concept
            c = replace(configs[variant], concepts=(target,)) if configs is not None else \
                replace(cfg, concepts=(target,), **({"gate": cfg.gate} | options[variant]))
            on, masks = gen.from_latents(pipe_of(target), x_T[k:k + 1], "", c, seed=s.seed, steps=s.steps,
                                         guidance=s.guidance,
                                         trajectory=[level[k:k + 1] for level in trajectory])
            r, o = bool(~shows(judge, on, target)[0]), bool(shows(judge, on, other)[0])
            removed.append(r)
            kept.append(o)
            both.append(r and o)
            if masks is not None and masks.any():
                intervened += 1
                psnrs.append(outside_mask_change(off[k:k + 1], on, masks)[0])
        gate = configs[variant].gate if configs is not None else options[variant].get("gate", cfg.gate)
        rows.append({"variant": variant, "gate": gate, "n": n,
                     "target_removed": float(np.mean(removed)), "other_kept": float(np.mean(kept)),
                     "removed_and_kept": float(np.mean(both)), "intervened": intervened / n,
                     "psnr_outside_mask_db": float(np.mean(psnrs)) if psnrs else float("nan")})
    return rows


def run(model_dir, concept: str = "star", wrong: str = "moon", methods=("uce",), n: int = 16, n_pairs: int = 20,
        threshold: float | None = None, s: BenchSettings | None = None,
        parts=PARTS, gate: str = PRESENCE_GATE, grow: int = 0, pairs_erased: str | None = None,
        negative_guidance: float = 0.0, negative_guidance_steps: int = 0) -> dict:
    """pairs_erased: an erasure method; the two-shape scenes then continue after t* on a model that erased their
    target (one erasure per concept, cached), instead of the standard model. negative_guidance: every gated
    setting steers re-noised regions away from the concept (the paper's rows never do)."""
    s = s or BenchSettings(n=n)
    judge = load_judge()
    d = IreceConfig.defaults()
    cfg = IreceConfig(tau=s.tau, t_star=s.t_star, threshold=d.threshold if threshold is None else threshold,
                      gate=gate, grow=grow, negative_guidance=negative_guidance,
                      negative_guidance_steps=negative_guidance_steps)
    cache: dict = {}

    def pipe_for(erased):
        if erased not in cache:
            cache[erased] = load_pipeline(model_dir, erased)
        return cache[erased]
    others = [c for c in shapes.CONCEPTS if c != concept][:3]
    return {"settings": {"n": s.n, "steps": s.steps, "tau": cfg.tau, "t_star": cfg.t_star,
                         "threshold": cfg.threshold, "gate": gate, "grow": grow,
                         "negative_guidance": negative_guidance, "negative_guidance_steps": negative_guidance_steps,
                         "concept": concept, "wrong": wrong, "pairs_erased": pairs_erased},
            **({"wrong_concept": wrong_concept(pipe_for, judge, model_dir, concept, wrong, methods, s, cfg)}
               if "wrong_concept" in parts else {}),
            **({"benign": benign(pipe_for(erased_unet(model_dir, "uce", concept, s)), concept, others, s, cfg)}
               if "benign" in parts else {}),
            **({"pairs": pairs(pipe_for(None), judge, n_pairs, s, cfg, erased_for=None if pairs_erased is None else
                               lambda target: pipe_for(erased_unet(model_dir, pairs_erased, target, s)))}
               if "pairs" in parts else {})}
