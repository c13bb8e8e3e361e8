"""`irece bench policy`: one table for a named policy on the committed world, the paper's policy a row of every part.

Parts (each configured exactly as the server runs the policy: `policy.resolve`, numbers from the calibration block):
  crr      every scenario of the CRR table x concepts x erasure methods (`bench crr`'s cells, content-cached,
           `--ray` runs them as Ray tasks); its wrong-concept control (IRECE aimed at another concept), preservation
           and PSNR outside the mask come with it
  benign   requests showing other concepts - text, learned embedding (textual inversion on the standard model),
           inverted render - bit-identical to IRECE off
  pairs    two-shape scenes, one shape the target, on the model that erased it: target removed and other kept
  adaptive the attacks of `bench adaptive` (white-box TI and PGD, black-box PGD and prompt search) aimed at the
           policy itself, at bench adaptive's budgets, on one concept (`adaptive_concept`), cached per attack
"""
from __future__ import annotations

import json
import time

import numpy as np

from irece_runtime.loading import load_pipeline
from irece_runtime.policy import resolve
from miniworld import shapes
from miniworld.judge import load_judge
from miniworld.prompts import concept_prompts

from . import attacks
from . import batch as gen
from . import crr
from .cache import key, model_fingerprint, write_atomic
from .gate import pairs

PARTS = ("crr", "benign", "pairs", "adaptive")
METHODS = ("uce", "esd-x", "esd-u", "receler")
BENIGN_SEED = 7_400_000


def benign(model_dir: str, method: str, concept: str, policy: str, s: crr.BenchSettings, n_others: int = 2) -> dict:
    """With `concept` erased and protected, requests of `n_others` other concepts: share bit-identical to IRECE off
    per modality, under the policy and under the paper's (cached per cell)."""
    path = key("policy-benign", model=model_fingerprint(model_dir), method=method, concept=concept, policy=policy,
               config=crr.config_key(resolve(policy, model_dir, [concept])), n=s.n, n_others=n_others, seed=s.seed,
               steps=s.steps).with_suffix(".json")
    if path.exists():
        return json.loads(path.read_text())
    erased = crr.erased_unet(model_dir, method, concept, s)
    pipe = load_pipeline(model_dir, erased)
    k = shapes.CONCEPTS.index(concept)
    others = [shapes.CONCEPTS[(k + 1 + j) % len(shapes.CONCEPTS)] for j in range(n_others)]
    same = {name: {"text": 0, "embedding": 0, "inverted_latent": 0} for name in (policy, "paper")}
    for o in others:
        seeds = [BENIGN_SEED + 1000 * shapes.CONCEPTS.index(o) + i for i in range(s.n)]
        vec = crr.ti_embedding(pipe, model_dir, None, "standard", o, s)  # a benign learned embedding of o
        ti_prompts = [attacks.TI_TEMPLATES[i % len(attacks.TI_TEMPLATES)].format("<c>") for i in range(s.n)]
        refs = np.stack([shapes.render(o, seed=BENIGN_SEED + 77 + i).image for i in range(s.n)])
        levels: list = []
        x_T = gen.invert_images(pipe, refs, "erased", s.steps, trajectory=levels)

        def requests(cfg):
            return {"text": gen.from_prompts(pipe, concept_prompts(o, s.n, s.seed + 11), seeds, cfg, steps=s.steps,
                                             guidance=s.guidance)[0],
                    "embedding": gen.from_prompts(pipe, ti_prompts, seeds, cfg, learned={"<c>": vec}, steps=s.steps,
                                                  guidance=s.guidance)[0],
                    "inverted_latent": gen.from_latents(pipe, x_T, "", cfg, seed=s.seed, steps=s.steps,
                                                        guidance=s.guidance, trajectory=levels)[0]}
        off = requests(None)
        for name in same:
            on = requests(resolve(name, model_dir, [concept]))
            for modality in off:
                same[name][modality] += int(sum(np.array_equal(a, b) for a, b in zip(off[modality], on[modality])))
    out = {"method": method, "concept": concept, "others": others, "n": s.n * n_others,
           "identical": {name: {m: v / (s.n * n_others) for m, v in per.items()} for name, per in same.items()}}
    write_atomic(path, json.dumps(out))
    return out


def run(model_dir: str, policy: str = "gated", methods=METHODS, concepts=shapes.CONCEPTS, n: int = 16,
        n_pairs: int = 100, parts=PARTS, seed: int = 0, ray: str | None = None, log=print,
        adaptive_concept: str = "star", budgets: dict | None = None, quick: bool = False) -> dict:
    """The policy's table (parts as named in PARTS); `quick`: the shortest schedule, erasures and inversions that
    still wire every part through (a smoke run, not a figure)."""
    t0 = time.time()
    defences = ("none", "policy:paper", f"policy:{policy}")
    s = crr.BenchSettings(n=n, seed=seed, defences=defences)
    if quick:
        s.steps, s.erase_steps, s.ti_steps = 10, 20, 20
    out: dict = {"policy": policy, "config": crr.config_key(resolve(policy, model_dir, ["<concept>"])),
                 "model": model_dir, "methods": list(methods), "concepts": list(concepts), "n": n}
    if "crr" in parts:
        out["crr"] = crr.run(model_dir, concepts, methods, crr.SCENARIOS, s, log=log, ray=ray)
    if "benign" in parts:
        out["benign"] = [benign(model_dir, m, c, policy, s) for m in methods for c in concepts]
        log(f"[{time.time() - t0:6.0f}s] benign done")
    if "pairs" in parts:
        judge, cache = load_judge(), {}

        def erased_for(method):
            def pipe_of(target):
                if (method, target) not in cache:
                    cache[method, target] = load_pipeline(model_dir, crr.erased_unet(model_dir, method, target, s))
                return cache[method, target]
            return pipe_of
        configs = {name: resolve(name, model_dir, ["<concept>"]) for name in ("paper", policy)}
        standard = load_pipeline(model_dir)
        out["pairs"] = []
        for m in methods:
            for row in pairs(standard, judge, n_pairs, s, configs["paper"], erased_for=erased_for(m), configs=configs):
                out["pairs"].append({"method": m, **row})
            cache.clear()
            log(f"[{time.time() - t0:6.0f}s] pairs {m} done")
    if "adaptive" in parts:
        from . import adaptive
        a = adaptive.AdaptiveSettings(n=n, seed=seed, model=model_dir, steps=s.steps, erase_steps=s.erase_steps,
                                      ti_steps=s.ti_steps, budgets=dict(budgets or (adaptive.QUICK_BUDGETS if quick
                                                                                    else adaptive.FULL_BUDGETS)))
        out["adaptive"] = adaptive.run(model_dir, adaptive_concept, methods, tuple(a.budgets), a, log=log,
                                       policy=policy)
        log(f"[{time.time() - t0:6.0f}s] adaptive done")
    out["seconds"] = round(time.time() - t0, 1)
    return out


def markdown(res: dict) -> str:
    """The policy's table: per method, its row beside the paper's and the erased model alone."""
    policy, lines = res["policy"], []
    names = {"none": "off", "policy:paper": "paper", f"policy:{policy}": policy}
    if "crr" in res:
        rows = res["crr"]["rows"]
        lines += [f"CRR (%) pooled over {len(res['concepts'])} concept(s), n = {res['n']} a cell and defence; "
                  f"off -> paper -> {policy}", "",
                  "| method | " + " | ".join(crr.SCENARIOS) + " | inversions pooled |",
                  "|---|" + "---|" * (len(crr.SCENARIOS) + 1)]
        for m in res["methods"]:
            cells = [" → ".join(f"{100 * crr.pooled(rows, method=m, scenario=sc, defence=d)['crr']:.0f}"
                                for d in names) for sc in crr.SCENARIOS]
            inv = [sc for sc in crr.SCENARIOS if sc.startswith("inv_")]
            pooled = []
            for d in names:
                sel = [r for r in rows if r["method"] == m and r["defence"] == d and r["scenario"] in inv]
                pooled.append(f"{100 * sum(r['k'] for r in sel) / max(1, sum(r['n'] for r in sel)):.1f}")
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {' → '.join(pooled)} |")
        controls, quality = res["crr"]["controls"], res["crr"]["quality"]
        lines += ["", f"Aimed at another concept (white-box inversion, null prompt), the erased concept survives; PSNR "
                      f"outside the mask on inverted scenarios; preservation of the other concepts' prompts:", "",
                  "| method | defence | survives (wrong aim) | PSNR outside, inverted (dB) | preservation |",
                  "|---|---|---|---|---|"]
        for m in res["methods"]:
            for d in list(names)[1:]:
                sel = [c for c in controls if c["method"] == m and c["defence"] == d]
                off = crr.pooled(rows, method=m, scenario="inv_white_null", defence="none")
                got = sum(c["k"] for c in sel) / max(1, sum(c["n"] for c in sel))
                survives = got / off["crr"] if off["crr"] else float("nan")
                q = [x["psnr_outside"] for x in quality if x["method"] == m and x["defence"] == d
                     and x["scenario"].startswith("inv_")]
                pres = [x["accuracy"] for x in res["crr"]["preservation"] if x["method"] == m and x["defence"] == d]
                lines.append(f"| {m} | {names[d]} | {100 * survives:.0f}% | {np.mean(q):.1f} | "
                             f"{100 * np.mean(pres):.0f}% |")
    if "benign" in res:
        lines += ["", "Benign requests (other concepts) bit-identical to IRECE off:", "",
                  "| method | policy | text | embedding | inverted |", "|---|---|---|---|---|"]
        for m in res["methods"]:
            sel = [b for b in res["benign"] if b["method"] == m]
            for name in ("paper", policy):
                vals = [np.mean([b["identical"][name][k] for b in sel]) for k in ("text", "embedding", "inverted_latent")]
                lines.append(f"| {m} | {name} | " + " | ".join(f"{100 * v:.1f}%" for v in vals) + " |")
    if "pairs" in res:
        lines += ["", "Two shapes, one the target, on the model that erased it (target removed and other kept):", "",
                  "| method | variant | n | removed and kept | target removed | other kept | PSNR outside (dB) |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["pairs"]:
            lines.append(f"| {r['method']} | {r['variant']} | {r['n']} | {100 * r['removed_and_kept']:.1f}% | "
                         f"{100 * r['target_removed']:.1f}% | {100 * r['other_kept']:.1f}% | "
                         f"{r['psnr_outside_mask_db']:.1f} |")
    if "adaptive" in res:
        from . import adaptive
        lines += ["", f"Adaptive attacks aimed at the {policy} policy ({res['adaptive']['rows'][0]['concept']}; "
                      "CRR on seeds the attacks never saw):", "", adaptive.markdown(res["adaptive"])]
    return "\n".join(lines) + "\n"
