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


def test_text_encoder_checkpoint_in_sd_layout():
    """SD v1.4's `text_model.` key layout: transformers 4.x (optimum's stack) would otherwise load random weights."""
    from safetensors import safe_open

    from .conftest import MODEL
    with safe_open(str(MODEL / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)


def test_peers_side_by_side_do_the_same_work(tmp_path):
    """diffusers, optimum (when its virtualenv is there: `make test` builds it) and our backends, interleaved:
    with IRECE off every system must draw diffusers' image from the same seed; IRECE on must change it."""
    from benchmarks import peers

    from .conftest import MODEL
    res = peers.run(MODEL, steps=3, n=2, warmup=1, n_check=2, out_dir=tmp_path, progress=False)
    rows = {r["system"]: r for r in res["rows"]}
    expected = {"diffusers", "irece torch", "irece torch +IRECE", "irece onnx", "irece onnx +IRECE"}
    if peers.PEERS_PYTHON.exists():
        expected.add("optimum")
        assert "irece_onnx_irece_on_over_optimum_p50" in res["verdict"]
        assert res["versions"]["optimum"]["transformers"].startswith("4.")
    assert set(rows) == expected
    for name, r in rows.items():
        assert r["n"] == 2 and r["p50_ms"] > 0 and r["peak_rss_mb"] > 50, name
        if r["irece"]:
            assert r["vs"] == name.removesuffix(" +IRECE") and r["mean_abs_diff_255"] > 1.0, name
        else:
            assert r["vs"] == "diffusers" and r["max_abs_diff_255"] <= 2.0, (name, r["max_abs_diff_255"])
    assert rows["diffusers"]["p50_vs_diffusers"] == 1.0


def test_peers_erased_folder_is_the_erased_unet_for_diffusers(tmp_path, monkeypatch):
    """diffusers and optimum get a model folder whose UNet is the erased one and whose other parts are ours."""
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks import cache, peers
    from irece_runtime.engines import load_unet
    from irece_runtime.erasers import ERASERS_FILE
    from erasure.methods import erase

    from .conftest import MODEL
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    erased = tmp_path / "uce-star"
    erase("uce", MODEL, "star", erased)
    folder = peers.diffusers_folder(MODEL, erased)
    assert (folder / "text_encoder").resolve() == (MODEL / "text_encoder").resolve()
    got = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    want, base = load_unet(erased, MODEL).state_dict(), load_unet(MODEL).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(want[k], base[k]) for k in want)  # and it is not the standard UNet
    receler = tmp_path / "receler"
    receler.mkdir()
    (receler / ERASERS_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match="Receler"):
        peers.diffusers_folder(MODEL, receler)
