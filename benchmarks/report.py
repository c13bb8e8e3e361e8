"""Markdown tables and PNG charts from `irece bench` JSON."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .crr import METHODS, PAPER_TAU, SCENARIOS, pooled


def _cell(p: dict) -> str:
    return f"{100 * p['crr']:.0f}" if p["n"] else "–"


LABEL = {"none": "off", "irece-paper": "paper", "irece-gated": "gated", "full": "full", "full-keep": "full+keep",
         "gated+recheck": "gated+recheck"}


def _defences(res: dict) -> list[str]:
    from .crr import CHOICES
    return [d for d in CHOICES if any(r.get("defence") == d for r in res["rows"])]


def crr_markdown(res: dict) -> str:
    rows = res["rows"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    scen = [s for s in SCENARIOS if any(r["scenario"] == s for r in rows)]
    concepts = sorted({r["concept"] for r in rows})
    ds = _defences(res)
    arrow = " → ".join(LABEL[d] for d in ds)
    out = [f"CRR (%) pooled over {len(concepts)} concept(s) ({', '.join(concepts)}); each cell: {arrow} "
           f"(off: erased model alone; paper: IRECE always intervening, at the paper's tau {PAPER_TAU}; gated: IRECE "
           f"behind the presence gate ({res['settings'].get('gate', 'classifier')}, tau {res['settings']['tau']}, "
           f"masks grown by {res['settings'].get('grow', 0)}"
           + (f", steered away from the concept with negative guidance {ng}"
              + (f" for {k} steps" if (k := res['settings'].get('negative_guidance_steps', 0)) else "")
              if (ng := res['settings'].get('negative_guidance', 0)) else "") + "); "
           f"n per cell and 95% Wilson intervals in the JSON).", "",
           "| method | " + " | ".join(scen) + " |", "|---|" + "---|" * len(scen)]
    for m in methods:
        cells = [" → ".join(_cell(pooled(rows, method=m, scenario=sc, defence=d)) for d in ds) for sc in scen]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    on = [d for d in ds if d != "none"]
    out += ["", "Preservation (judge accuracy on the other concepts' prompts, erased model) and, where IRECE ran, "
                "image change outside its mask against the undefended image (mean over scenarios):", "",
            "| method | defence | preservation | PSNR outside mask (dB) | SSIM outside mask | mask area | intervened |",
            "|---|---|---|---|---|---|---|"]
    for m in methods:
        for d in ds:
            pr = [p["accuracy"] for p in res["preservation"] if p["method"] == m and p["defence"] == d]
            q = [x for x in res["quality"] if x["method"] == m and x["defence"] == d]
            qual = (f"{np.mean([x['psnr_outside'] for x in q]):.1f} | {np.mean([x['ssim_outside'] for x in q]):.3f} | "
                    f"{np.mean([x['mask_area'] for x in q]):.2f} | {100 * np.mean([x['intervened'] for x in q]):.0f}%"
                    if q else "– | – | – | –")
            out.append(f"| {m} | {LABEL[d]} | {100 * np.mean(pr):.0f}% | {qual} |")
    if res.get("controls"):
        out += ["", "Control: IRECE aimed at a *different* concept on white-box inverted latents (null prompt). "
                    "CRR falling as far as with the right concept would mean noise, not localization, did the work.",
                "", "| method | defence | CRR off | IRECE on the erased concept | IRECE on a wrong concept |",
                "|---|---|---|---|---|"]
        for m in methods:
            off = pooled(rows, method=m, scenario="inv_white_null", defence="none")
            for d in on:
                ctrl = [c for c in res["controls"] if c["method"] == m and c["defence"] == d]
                k, n = sum(c["k"] for c in ctrl), sum(c["n"] for c in ctrl)
                right = pooled(rows, method=m, scenario="inv_white_null", defence=d)
                out.append(f"| {m} | {LABEL[d]} | {_cell(off)} | {_cell(right)} | {100 * k / n:.0f} |" if n
                           else f"| {m} | {LABEL[d]} | – | – | – |")
    return "\n".join(out) + "\n"


def crr_chart(res: dict, path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    scen = [s for s in SCENARIOS if any(r["scenario"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.6), sharey=True, squeeze=False)
    x = np.arange(len(scen))
    for ax, m in zip(axes[0], methods):
        ds = _defences(res)
        width = 0.8 / len(ds)
        for j, (d, colour) in enumerate(zip(ds, ("tab:red", "tab:blue", "tab:green"))):
            dx = (j - (len(ds) - 1) / 2) * width
            ps = [pooled(rows, method=m, scenario=s, defence=d) for s in scen]
            y = np.array([p["crr"] for p in ps]) * 100
            err = np.array([[p["crr"] - p["ci95"][0], p["ci95"][1] - p["crr"]] for p in ps]).T * 100
            err = np.clip(err, 0, None)  # Wilson bounds can round a hair past the estimate
            ax.bar(x + dx, y, width, yerr=err, color=colour, label=f"IRECE {LABEL[d]}", capsize=2)
        ax.set_title(m)
        ax.set_xticks(x, scen, rotation=70, fontsize=7)
    axes[0][0].set_ylabel("CRR (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
