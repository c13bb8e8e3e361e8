"""Benchmark arithmetic, and every scenario wired through on a tiny smoke run."""
import math

import numpy as np
import pytest

from benchmarks import stats


def test_crr_counts_the_concept_label():
    assert stats.crr(["star", "moon", "star", "none"], "star") == 0.5
    assert math.isnan(stats.crr([], "star"))


def test_wilson_interval_known_values():
    lo, hi = stats.wilson(7, 10)  # textbook value: 0.3968 .. 0.8922
    assert lo == pytest.approx(0.3968, abs=1e-3) and hi == pytest.approx(0.8922, abs=1e-3)
    lo, hi = stats.wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-3)
    lo, hi = stats.wilson(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-3)
    assert stats.wilson(0, 0) == (0.0, 1.0)


def test_psnr_and_ssim_on_known_images():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert stats.psnr(a, a) == float("inf")
    assert stats.psnr(a, b) == pytest.approx(10 * np.log10(64 * 3), abs=1e-6)  # one wrong value in 192
    mask = np.ones((8, 8), bool)
    mask[0, 0] = False
    assert stats.psnr(a, b, mask) == float("inf")  # the difference is outside the mask
    assert stats.ssim(a, a) == pytest.approx(1.0)
    assert stats.ssim(a, b) < 1.0


def test_pooled_rows():
    from benchmarks.crr import pooled
    rows = [{"method": "uce", "scenario": "text", "irece": False, "k": 1, "n": 4},
            {"method": "uce", "scenario": "text", "irece": False, "k": 3, "n": 4},
            {"method": "uce", "scenario": "text", "irece": True, "k": 0, "n": 4}]
    p = pooled(rows, method="uce", irece=False)
    assert p["crr"] == 0.5 and p["n"] == 8 and p["ci95"] == list(stats.wilson(4, 8))


@pytest.mark.slow
def test_every_scenario_and_method_wired_through(tmp_path, monkeypatch):
    from benchmarks import cache, crr, report
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    s = crr.BenchSettings(n=2, n_preserve=1, steps=4, erase_steps=2, ti_steps=2)
    res = crr.run(concepts=["star"], s=s, log=lambda *a: None)
    cells = {(r["method"], r["scenario"], r["irece"]) for r in res["rows"]}
    assert cells == {(m, sc, on) for m in crr.METHODS for sc in crr.SCENARIOS for on in (False, True)}
    for r in res["rows"]:
        assert r["n"] == 2 and 0 <= r["crr"] <= 1 and r["ci95"][0] <= r["crr"] <= r["ci95"][1]
    assert len(res["preservation"]) == 2 * len(crr.METHODS)
    md = report.crr_markdown(res)
    assert "| receler |" in md and "inv_white_null" in md
    report.crr_chart(res, tmp_path / "crr.png")
    assert (tmp_path / "crr.png").stat().st_size > 0
    # a rerun comes from the cache: same rows, no recomputation
    again = crr.run(concepts=["star"], s=s, log=lambda *a: None)
    assert again["rows"] == res["rows"] and again["seconds"] < res["seconds"]
