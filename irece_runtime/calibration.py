"""`irece calibrate`: the policy's model-dependent numbers from the model's own generations (no renderer, no judge).

Positives and negatives come from prompts: the standard model generates each prompt of one or two of the head's
concepts (and the empty prompt), and a concept counts as present where its prompt named it - where the model's own
diffusion classifier finds the prompt's concepts in its image (`check`; else the prompt is left out: the model drew
something else, which would count as a false positive) - and absent where the prompt did not name it and the
classifier does not rank it as high as a named one (`head_training.labels`: else left out; the highest-scoring
generated negatives came mostly from two-concept and empty prompts, where the model draws shapes its prompt did not
name). The concept head scores
every concept at t* on two kinds of latent, as the gate meets them: the text trajectory's x_t, and the generated
image decoded, encoded and DDIM-inverted by the standard model with the null prompt (an inverted request). The
presence threshold is the lowest that keeps the false-positive rate of a calibration split within the FPR budget
(the service's promise is to leave benign requests untouched), at t* and at each recheck look apart (the head's
scores at 0.7 are not those at 0.5); a held-out split of other seeds reports each look's TPR/FPR. t* is where the
head was trained; tau is the head's own cell probability for a mask (`--tau`).
"""
from __future__ import annotations

import itertools
import time

import numpy as np
import torch
from scipy.stats import rankdata
from tqdm import tqdm

from . import irece
from .irece import RECHECK
from .images import to_tensor, to_uint8
from .pipeline import Pipeline, guided_eps, sample, trajectory
from .calls import drive
from .concept_head import DEFAULT_TAU
from .head_training import CHECK_AT, caption, classifier_ranks, labels, schedule_indices

CALIBRATION_SEED, HELD_OUT_SEED = 8_100_000, 8_200_000
# 240 calibration prompts by default: the threshold is a high percentile of the negatives' scores, which a few images
# move (the mini model's self-made head: 0.405 with 120 prompts, 0.393 with 240; 240 cost ~140 s on 2 cores)


def auc(labels, scores) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) statistic; ties count half."""
    y, s = np.asarray(labels, bool), np.asarray(scores, float)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def constrained_threshold(labels, scores, max_fpr: float) -> float:
    """The lowest threshold whose false-positive rate stays <= max_fpr: as many present concepts caught as the
    budget of benign requests touched allows (the service's promise is to leave benign requests untouched)."""
    y, s = np.asarray(labels, bool), np.asarray(scores, float)
    neg = np.sort(s[~y])
    if not len(neg):
        return float(s.min()) if len(s) else 0.5
    k = int(np.floor(max_fpr * len(neg)))  # negatives allowed at or above the threshold
    top = neg[len(neg) - k - 1]  # the highest negative that must stay below it
    above = s[s > top]
    return float((top + above.min()) / 2) if len(above) else float(top + 1e-6)


def rates(labels, scores, threshold: float) -> dict:
    y, s = np.asarray(labels, bool), np.asarray(scores, float)
    return {"auc": auc(y, s), "tpr": float((s[y] >= threshold).mean()) if y.any() else float("nan"),
            "fpr": float((s[~y] >= threshold).mean()) if (~y).any() else float("nan"),
            "n_pos": int(y.sum()), "n_neg": int((~y).sum())}


def prompts(concepts: tuple[str, ...], n: int, seed: int, pair_share: float = 0.4, empty_share: float = 0.1
            ) -> list[tuple[str, frozenset]]:
    """n (prompt, concepts it names): one concept ("a c"), two ("a c1 and a c2") or none (the empty prompt)."""
    rng = np.random.default_rng(seed)
    pairs = list(itertools.combinations(concepts, 2))
    out = []
    for i in range(n):
        u = rng.random()
        if u < empty_share:
            out.append(("", frozenset()))
        elif u < empty_share + pair_share and pairs:
            a, b = pairs[rng.integers(len(pairs))]
            out.append((caption((a, b)), frozenset((a, b))))
        else:
            c = concepts[i % len(concepts)]
            out.append((caption((c,)), frozenset((c,))))
    return out


def head_latents(pipe: Pipeline, items: list, seed: int, at: list[int], steps: int, guidance: float
                 ) -> dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """(i, t, x_t) at each schedule index in `at` for each prompt: on the standard model's text trajectory, and after
    its image was decoded, encoded and inverted (null prompt) by the standard model."""
    e, side = pipe.backend, pipe.sample_size
    uncond = pipe.null_hidden
    cond = torch.cat([pipe.encode_prompt(p) for p, _ in items])
    x_T = torch.cat([torch.randn((1, e.latent_channels, side, side), generator=torch.Generator().manual_seed(seed + k))
                     for k in range(len(items))]).to(e.device)
    text = trajectory(pipe, x_T, cond, uncond, guidance, steps, at)
    late, seen = schedule_indices([CHECK_AT], steps)[0], []

    def record(i, t, x_t):
        if i == late:
            seen.append((t, x_t))
        return x_t
    x0 = drive(sample(guided_eps("standard", cond, uncond, guidance), x_T.clone(), pipe.scheduler(steps), (record,)), e)
    x_inv = pipe.invert(e.vae_encode(to_tensor(to_uint8(pipe.decode(x0)))), uncond, "standard", steps)
    return {"text": text, "inverted": trajectory(pipe, x_inv, uncond, uncond, guidance, steps, at), "late": seen[0]}


def score(pipe: Pipeline, n: int, seed: int, looks: list[float], steps: int, guidance: float, batch: int,
          progress=None, check: bool = True) -> list[dict]:
    """Rows (look, source, concept, present, score) of the head's presence score for every head concept, prompt and
    look (a fraction of the schedule). With `check`, a prompt whose image the model's diffusion classifier does not
    find its concepts in gives no rows (its image shows something else than its labels say, and its concepts would
    count as absent where another was drawn), nor does an unnamed concept the classifier ranks as high
    (head_training.labels)."""
    concepts = pipe.head_concepts
    items = prompts(concepts, n, seed)
    at = {irece.IreceConfig(t_star=when).step_index(steps): when for when in looks}
    rows = []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        latents = head_latents(pipe, chunk, seed + s, sorted(at), steps, guidance)
        t_c, x_c = latents.pop("late")
        verdict = labels([named for _, named in chunk], classifier_ranks(pipe, x_c, t_c, concepts) if check else None,
                         concepts)
        for source, seen in latents.items():
            for i, t, x_t in seen:
                scores = irece.head_scores(drive(pipe.head_steps(x_t, t), pipe.backend).float()).cpu().numpy()
                rows += [{"look": at[i], "source": source, "concept": c, "present": verdict[k][j],
                          "score": float(scores[k, j]), "item": s + k}
                         for k in range(len(chunk)) if verdict[k] is not None
                         for j, c in enumerate(concepts) if verdict[k][j] is not None]
        if progress:
            progress(len(chunk))
    return rows


def calibrate(pipe: Pipeline, n: int = 240, n_held_out: int = 120, max_fpr: float = 0.03, tau: float = DEFAULT_TAU,
              steps: int = 25, guidance: float = 5.0, batch: int = 40, t_star: float | None = None,
              looks: tuple[float, ...] = RECHECK, check: bool = True) -> dict:
    """The calibration block (policy.write_calibration stores it): t_star and the recheck looks, each with its own
    threshold, and tau, with the splits and the FPR budget they came from and the held-out split's rates."""
    if not pipe.head_concepts:
        raise ValueError("the model folder has no concept head: train one first (`irece head train --model M --concepts ...`)")
    t_star = float(pipe.head_trained_at[0]) if t_star is None else float(t_star)
    points = [t_star] + [float(w) for w in looks]
    t0 = time.perf_counter()
    with tqdm(total=n + n_held_out, desc="calibrate", unit="prompt") as bar:
        cal = score(pipe, n, CALIBRATION_SEED, points, steps, guidance, batch, bar.update, check)
        held = score(pipe, n_held_out, HELD_OUT_SEED, points, steps, guidance, batch, bar.update, check)

    def of(rows, when, source=None):
        sel = [r for r in rows if r["look"] == when and source in (None, r["source"])]
        return [r["present"] for r in sel], [r["score"] for r in sel]
    thresholds = [constrained_threshold(*of(cal, when), max_fpr) for when in points]
    return {"t_star": t_star, "tau": float(tau), "threshold": thresholds[0], "recheck": points[1:],
            "recheck_threshold": thresholds[1:], "max_fpr": max_fpr,
            "rule": f"lowest threshold with calibration FPR <= {max_fpr}, at each look",
            "source": "the model's own generations (prompt labels), text and inverted latents",
            "split": {"calibration": {"prompts": n, "kept": len({r["item"] for r in cal}), "seed": CALIBRATION_SEED},
                      "held_out": {"prompts": n_held_out, "kept": len({r["item"] for r in held}),
                                   "seed": HELD_OUT_SEED}, "steps": steps, "guidance": guidance, "check": check},
            "held_out_rates": [{"t": when, **{src: rates(*of(held, when, src), thr) for src in ("text", "inverted")}}
                               for when, thr in zip(points, thresholds)],
            "command": f"irece calibrate --model <model> --n {n} --n-held-out {n_held_out} --max-fpr {max_fpr} "
                       f"--tau {tau}" + ("" if check else " --no-check"),
            "seconds": round(time.perf_counter() - t0, 1)}
