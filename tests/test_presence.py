"""The presence benchmark's statistics (known values) and its wiring on the model under test."""
import json

import numpy as np
import pytest

from .conftest import MODEL

from irece_runtime.irece import PRESENCE_GATE

from benchmarks.presence import auc, calibrate, constrained_threshold, summarize, youden_threshold


def test_auc_known_values():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties count half
    assert auc([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]) == 0.75  # 3 of the 4 positive/negative pairs ordered
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


def test_youden_threshold_separates_and_summarize_reports_rates():
    y, s = [0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]
    t = youden_threshold(y, s)
    assert 0.3 < t < 0.6
    rows = [{"present": bool(a), "score": b} for a, b in zip(y, s)]
    out = summarize(rows, t)
    assert out["tpr"] == 1.0 and out["fpr"] == 0.0 and out["auc"] == 1.0 and out["n_pos"] == 3


def test_constrained_threshold_keeps_false_positives_within_budget():
    y = [0] * 10 + [1] * 4
    s = [0.1 * k for k in range(10)] + [0.55, 0.85, 0.95, 0.99]  # negatives 0.0..0.9
    t = constrained_threshold(y, s, 0.0)
    assert 0.9 < t <= 0.95  # above every negative; catches the two positives above 0.9
    t = constrained_threshold(y, s, 0.1)  # one negative of ten (0.9) may pass: the cut drops under 0.85
    assert 0.8 < t <= 0.85
    rows = [{"present": bool(a), "score": b, "concept": "star" if k % 2 else "moon"} for k, (a, b) in enumerate(zip(y, s))]
    cal = calibrate(rows, max_fpr=0.0, min_per_concept=2)
    assert cal["threshold"] == pytest.approx(constrained_threshold(y, s, 0.0))
    assert set(cal["per_concept"]) == {"star", "moon"}


@pytest.mark.shapes10_only  # its scenes are Shapes-10 renders
def test_bench_presence_quick_writes_every_figure(tmp_path, pipe):
    from irece_cli.main import main
    out = tmp_path / "presence.json"
    assert main(["bench", "presence", "--model", str(MODEL), "--quick", "--n", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert 0.0 <= res["held_out"]["auc"] <= 1.0
    assert res["held_out"]["n_pos"] >= 4 and res["held_out"]["n_neg"] > res["held_out"]["n_pos"]
    assert set(res["by_source"]) == {"text", "inverted"} and set(res["by_concept"]) == set(pipe.vocabulary)
    # perturbed references: every held-out scene again, its concepts scored against the whole vocabulary
    assert res["perturbed"]["n_pos"] == res["by_source"]["inverted"]["n_pos"]
    assert res["perturbed"]["n_neg"] == res["by_source"]["inverted"]["n_neg"]


@pytest.mark.shapes10_only  # Shapes-10 renders, judge and concept names
def test_bench_gate_quick_reports_both_gates_for_every_study(tmp_path):
    from irece_cli.main import main
    out = tmp_path / "gate.json"
    assert main(["bench", "gate", "--model", str(MODEL), "--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for study in ("wrong_concept", "benign"):
        assert {r["gate"] for r in res[study]} == {"off", PRESENCE_GATE}
    assert {r["gate"] for r in res["pairs"]} == {"none", "off", PRESENCE_GATE}
    from benchmarks.gate import pair_variants
    # IRECE off first (the ceiling: what the inversion alone keeps), then the gate's options, each a row
    assert [r["variant"] for r in res["pairs"]] == ["none"] + list(pair_variants(PRESENCE_GATE))
    assert res["pairs"][0]["intervened"] == 0.0 and res["pairs"][0]["removed_and_kept"] <= res["pairs"][0]["other_kept"]
    # the paper's always-intervene re-noises every benign request: none comes back bit-identical
    off = next(r for r in res["benign"] if r["gate"] == "off")
    assert off["identical_text"] == 0.0 and off["identical_inverted"] == 0.0
    aims = {(r["aimed_at"], r["defence"]) for r in res["wrong_concept"]}
    assert aims == {(a, d) for a in ("star", "moon") for d in ("irece-paper", "irece-gated", "full")}
