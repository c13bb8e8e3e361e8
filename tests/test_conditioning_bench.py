"""`irece bench conditioning`: the conditioning threshold is chosen on a calibration split under a false-drop budget
and reported on a held-out one."""
import json

import pytest

from benchmarks import conditioning


def row(score, positive, shown=-1.0, method="uce"):
    return {"method": method, "kind": "embedding", "of": "x", "positive": positive, "score": score,
            "shown_score": shown}


def test_rates_count_a_drop_at_either_bar():
    rows = [row(0.30, True), row(0.05, True, shown=0.12), row(0.02, True),
            row(0.01, False), row(0.20, False), row(0.0, False, shown=0.15)]
    r = conditioning.rates(rows, threshold=0.25, shown_threshold=0.1)
    assert r["caught"] == pytest.approx(2 / 3)  # 0.30 over the bar; 0.12 over the lower bar where the gate fired
    assert r["false_drops"] == pytest.approx(1 / 3)  # only the one the gate also fired on
    assert r["max_negative"] == 0.20 and (r["n_positive"], r["n_negative"]) == (3, 3)


@pytest.mark.slow
@pytest.mark.shapes10_only
def test_bench_conditioning_quick_calibrates_within_its_false_drop_budget(tmp_path, monkeypatch):
    from benchmarks import cache
    from irece_cli.main import main
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    out = tmp_path / "c.json"
    assert main(["bench", "conditioning", "--quick", "--t-star", "0.5", "--max-fpr", "0.1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    cal = res["rows"]["calibration"]
    thr = res["calibrated"]["threshold"]
    negatives = [r["score"] for r in cal if not r["positive"]]
    assert sum(s >= thr for s in negatives) <= 0.1 * len(negatives)
    assert {r["of"] for r in cal if r["kind"] == "embedding"} == {"star", *conditioning.CALIBRATION_OTHERS}
    assert {r["of"] for r in res["rows"]["held_out"] if r["kind"] == "embedding"} == {
        "star", *conditioning.HELD_OUT_OTHERS}
    assert set(res["splits"]) == {"calibration", "held_out"}
