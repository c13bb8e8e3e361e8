"""`irece bench presence`: does the presence gate tell a concept that is there from one that is not?

At t*, on the standard model's own trajectory (text prompts, and renders inverted with the null prompt), the gate
scores every concept of the vocabulary (`Pipeline.presence`: the diffusion classifier, irece.classifier_scores,
or the concept head, gates.head_look). Scores of concepts a scene shows are
positives, of the others negatives. Reported: ROC AUC (all, per source, per concept) on held-out seeds, and the
threshold calibrated on a separate calibration split (Youden's J), with its held-out true/false positive rates.
"""
from __future__ import annotations

import numpy as np
import torch

from irece_runtime.calibration import auc, constrained_threshold  # noqa: F401 (benchmarks use them from here)
from irece_runtime.irece import PRESENCE_GATE, IreceConfig
from irece_runtime.pipeline import trajectory
from miniworld import shapes

from . import batch as gen

CALIBRATION_SEED, HELD_OUT_SEED = 7_100_000, 7_200_000  # neither is used to train the mini world


def youden_threshold(labels, scores) -> float:
    """The threshold that maximises TPR - FPR (midpoint between neighbouring scores)."""
    y, s = np.asarray(labels, bool), np.asarray(scores, float)
    cands = np.unique(s)
    cuts = np.concatenate([[cands[0] - 1e-6], (cands[1:] + cands[:-1]) / 2, [cands[-1] + 1e-6]])
    j = [(s[y] >= c).mean() - (s[~y] >= c).mean() for c in cuts]
    return float(cuts[int(np.argmax(j))])


def calibrate(rows: list[dict], max_fpr: float = 0.03, min_per_concept: int = 8) -> dict:
    """Threshold(s) from a calibration split's rows: one for all concepts, and one per concept where it has at
    least `min_per_concept` positives (else the global one)."""
    y = [r["present"] for r in rows]
    s = [r["score"] for r in rows]
    out = {"rule": f"max TPR at FPR <= {max_fpr}", "max_fpr": max_fpr,
           "threshold": constrained_threshold(y, s, max_fpr), "youden": youden_threshold(y, s), "per_concept": {}}
    for c in dict.fromkeys(r["concept"] for r in rows):
        sub = [r for r in rows if r["concept"] == c]
        if sum(r["present"] for r in sub) >= min_per_concept:
            out["per_concept"][c] = constrained_threshold([r["present"] for r in sub], [r["score"] for r in sub],
                                                          max_fpr)
    return out


def latents_at(pipe, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance: float, steps: int,
               step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the standard model's sampler from x up to schedule index `step`; returns (x_t, t) there."""
    ((_, t, x_t),) = trajectory(pipe, x, cond, uncond, guidance, steps, (step,))
    return x_t, t


def scenes(n: int, seed: int, pair_share: float = 0.4) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if rng.random() < pair_share:
            out.append(shapes.render_scene(2, rng=rng))
        else:
            out.append(shapes.render(shapes.CONCEPTS[i % len(shapes.CONCEPTS)], rng=rng))
    return out


def scene_latents(pipe, scenes: list, source: str, seed: int, guidance: float, steps: int,
                  step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t at schedule index `step` on the standard model's trajectory for each scene: from a text prompt naming its
    shapes ("text"; noise seeded seed + k), or from its render inverted with the null prompt ("inverted"; "perturbed":
    the render noised, blurred or JPEG'd in turn first, as the CRR benchmark's black-box references are)."""
    uncond = pipe.encode_prompt("")
    if source == "text":
        cond = torch.cat([pipe.encode_prompt(sc.prompt()) for sc in scenes])
        x = gen.noise(pipe, [seed + k for k in range(len(scenes))])
        return latents_at(pipe, x, cond, uncond, guidance, steps, step)
    images = np.stack([sc.image for sc in scenes])
    if source == "perturbed":
        rng = np.random.default_rng(seed)
        images = np.stack([shapes.perturb(im, shapes.PERTURBATIONS[k % len(shapes.PERTURBATIONS)], rng=rng)
                           for k, im in enumerate(images)])
    x = gen.invert_images(pipe, images, "standard", steps)
    return latents_at(pipe, x, uncond, uncond, guidance, steps, step)


def score_scenes(pipe, items: list, source: str, cfg: IreceConfig, steps: int, guidance: float, seed: int,
                 batch: int = 32) -> list[dict]:
    """Presence scores of every vocabulary concept for each scene, from a text prompt naming its shapes
    ("text") or its render inverted with the standard model and the null prompt ("inverted")."""
    concepts = pipe.contrast_set(cfg)
    step = cfg.step_index(steps)
    rows = []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        x_t, t = scene_latents(pipe, chunk, source, seed + s, guidance, steps, step)
        sc_ = pipe.presence(x_t, t, cfg).cpu().numpy()
        for k, scene in enumerate(chunk):
            shown = {sh.concept for sh in scene.shapes}
            for j, c in enumerate(concepts):
                rows.append({"source": source, "shapes": len(shown), "concept": c, "present": c in shown,
                             "score": float(sc_[k, j])})
    return rows


def summarize(rows: list[dict], threshold: float | None = None) -> dict:
    y = [r["present"] for r in rows]
    s = [r["score"] for r in rows]
    out = {"auc": auc(y, s), "n_pos": int(sum(y)), "n_neg": len(y) - int(sum(y))}
    if threshold is not None:
        y_, s_ = np.asarray(y, bool), np.asarray(s)
        out["tpr"] = float((s_[y_] >= threshold).mean()) if y_.any() else float("nan")
        out["fpr"] = float((s_[~y_] >= threshold).mean()) if (~y_).any() else float("nan")
    return out


def score_splits(pipe, n: int, steps: int, guidance: float, cfg: IreceConfig,
                 splits=(("calibration", CALIBRATION_SEED), ("held_out", HELD_OUT_SEED))) -> dict:
    out = {}
    for name, seed in splits:
        items = scenes(n, seed)
        out[name] = score_scenes(pipe, items, "text", cfg, steps, guidance, seed) + \
            score_scenes(pipe, items, "inverted", cfg, steps, guidance, seed)
    return out


def run(model_dir, n: int = 100, steps: int = 25, guidance: float = 5.0, tau: float | None = None,
        t_star=None, layers=None, max_fpr: float = 0.03, gate: str = PRESENCE_GATE,
        classifier_timesteps: tuple[int, ...] | None = None) -> dict:
    from irece_runtime.loading import load_pipeline

    pipe = load_pipeline(model_dir, layers=layers)
    d = IreceConfig.defaults()
    cfg = IreceConfig(concepts=(), gate=gate, tau=d.tau if tau is None else tau,
                      classifier_timesteps=tuple(classifier_timesteps or d.classifier_timesteps),
                      t_star=d.t_star if t_star is None else t_star)
    split = score_splits(pipe, n, steps, guidance, cfg)
    cal = calibrate(split["calibration"], max_fpr)
    threshold = cal["threshold"]
    held = split["held_out"]
    res = {"gate": gate, "classifier_timesteps": list(cfg.classifier_timesteps),
           "n_scenes": n, "steps": steps, "tau": cfg.tau,
           "t_star": cfg.t_star, "threshold": threshold,
           "calibration": cal,
           "held_out": summarize(held, threshold),
           "held_out_youden": summarize(held, cal["youden"]),
           "by_source": {src: summarize([r for r in held if r["source"] == src], threshold)
                         for src in ("text", "inverted")},
           # the held-out renders perturbed before inversion (not in the AUC above, for comparison with earlier runs)
           "perturbed": summarize(score_scenes(pipe, scenes(n, HELD_OUT_SEED), "perturbed", cfg, steps, guidance,
                                               HELD_OUT_SEED), threshold),
           "by_scene": {str(k): summarize([r for r in held if r["shapes"] == k], threshold) for k in (1, 2)},
           "by_concept": {c: summarize([r for r in held if r["concept"] == c], threshold)
                          for c in pipe.contrast_set(cfg)}}
    stored = _stored_threshold(model_dir, gate, cfg.t_star)
    if stored is not None:  # the model's own calibration (`irece calibrate`: no renders) on the same held-out renders
        res["stored_calibration"] = {**stored, "held_out": summarize(held, stored["threshold"])}
    return res


def _stored_threshold(model_dir, gate: str, t_star) -> dict | None:
    """The head's calibration block's threshold at t_star (t* or a recheck look), if it has one for that look."""
    from irece_runtime.policy import has_calibration, read_calibration
    if gate != "head" or not has_calibration(model_dir):
        return None
    block = read_calibration(model_dir)
    looks = dict(zip([block["t_star"], *block.get("recheck", [])],
                     [block["threshold"], *block.get("recheck_threshold", [])]))
    if t_star not in looks:
        return None
    return {"threshold": looks[t_star], "source": block.get("source"), "max_fpr": block.get("max_fpr")}


def calibration_block(res: dict, looks: list[dict]) -> dict:
    """Head-gate runs as the model's calibration block (policy.write_calibration): the threshold at the FPR budget on
    the calibration split at t* (`res`) and at each recheck look (`looks`, one run each), tau (the head's mask cells),
    the splits and the held-out rates of each look."""
    def rates(r):
        return {"t": r["t_star"], **{k: r["held_out"][k] for k in ("auc", "tpr", "fpr")}}
    return {"t_star": res["t_star"], "tau": res["tau"], "threshold": res["threshold"],
            "recheck": [r["t_star"] for r in looks], "recheck_threshold": [r["threshold"] for r in looks],
            "max_fpr": res["calibration"]["max_fpr"], "rule": res["calibration"]["rule"] + ", at each look",
            "source": "Shapes-10 renders: text prompts and inverted renders (irece bench presence --gate head)",
            "split": {"calibration": {"scenes": res["n_scenes"], "seed": CALIBRATION_SEED},
                      "held_out": {"scenes": res["n_scenes"], "seed": HELD_OUT_SEED}, "steps": res["steps"]},
            "held_out_rates": [rates(r) for r in [res] + looks],
            "command": f"irece bench presence --gate head --n {res['n_scenes']} --t-star {res['t_star']} "
                       f"--tau {res['tau']} --write-calibration"
                       + (" --looks " + " ".join(str(r["t_star"]) for r in looks) if looks else "")}
