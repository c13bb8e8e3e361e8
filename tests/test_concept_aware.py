"""Concept-aware IRECE (the contrastive presence gate) on the mini world, at floors below what the full benchmarks
measure (BENCHMARKS.md), on seeds neither the threshold's calibration nor the benchmarks' held-out figures use.
The threshold itself is calibrated here, on the calibration split only, exactly as `irece bench tune` does."""
import numpy as np
import pytest

from benchmarks import batch as gen
from benchmarks import gate as gate_bench
from benchmarks import presence
from benchmarks.crr import BenchSettings, references
from benchmarks.localization import iou, masks_for, pixel_mask
from irece_runtime.irece import IreceConfig
from irece_runtime.loading import load_pipeline
from miniworld import shapes
from miniworld.judge import shows

from .conftest import MODEL

pytestmark = pytest.mark.shapes10_only
TEST_SEED = 7_600_000  # calibration uses 7_100_000, the benchmarks' held-out figures 7_200_000
D = IreceConfig.defaults()
FLOORS = {"auc": 0.90, "fpr": 0.10, "tpr": 0.75, "right_crr": 0.25, "wrong_survives": 0.75, "benign": 0.85,
          "iou": 0.45, "pairs": 0.70, "psnr": 20.0}


@pytest.fixture(scope="module")
def threshold(pipe):
    cfg = IreceConfig(gate="contrastive", tau=D.tau, t_star=D.t_star)
    rows = presence.score_splits(pipe, 30, 25, 5.0, cfg, splits=(("calibration", presence.CALIBRATION_SEED),))
    return presence.calibrate(rows["calibration"], 0.03)["threshold"]


def gated(threshold, *concepts) -> IreceConfig:
    return IreceConfig(concepts=concepts, gate="contrastive", threshold=threshold)


@pytest.fixture(scope="module")
def uce_star(tmp_path_factory):
    from erasure.methods import erase
    from miniworld.prompts import erase_prompts
    out = tmp_path_factory.mktemp("uce-star")
    erase("uce", MODEL, "star", out, prompts=erase_prompts)
    return load_pipeline(MODEL, out)


def test_presence_score_tells_present_from_absent_concepts(pipe, threshold):
    cfg = IreceConfig(gate="contrastive", tau=D.tau, t_star=D.t_star)
    rows = presence.score_splits(pipe, 30, 25, 5.0, cfg, splits=(("test", TEST_SEED),))["test"]
    s = presence.summarize(rows, threshold)
    assert s["auc"] >= FLOORS["auc"], s
    assert s["fpr"] <= FLOORS["fpr"] and s["tpr"] >= FLOORS["tpr"], s


def test_right_aim_suppresses_the_erased_concept_a_wrong_aim_leaves_it(uce_star, judge, threshold):
    """White-box DDIM inversion of star renders through the UCE-erased model, regenerated with the null prompt."""
    x_T = gen.invert_images(uce_star, references("star", 12, False, TEST_SEED), "erased")
    right, _ = gen.from_latents(uce_star, x_T, "", gated(threshold, "star"), seed=TEST_SEED)
    wrong, _ = gen.from_latents(uce_star, x_T, "", gated(threshold, "moon"), seed=TEST_SEED)
    off, _ = gen.from_latents(uce_star, x_T, "", None, seed=TEST_SEED)
    assert shows(judge, off, "star").mean() >= 0.75  # the attack works without IRECE
    assert shows(judge, right, "star").mean() <= FLOORS["right_crr"]
    assert shows(judge, wrong, "star").mean() >= FLOORS["wrong_survives"]


def test_benign_requests_come_back_bit_identical(uce_star, threshold):
    s = BenchSettings(n=6, seed=TEST_SEED)
    rows = gate_bench.benign(uce_star, "star", ["moon", "circle"], s, gated(threshold))
    row = next(r for r in rows if r["gate"] == "contrastive")
    assert row["identical_text"] >= FLOORS["benign"] and row["identical_inverted"] >= FLOORS["benign"], rows
    paper = next(r for r in rows if r["gate"] == "off")
    assert paper["identical_text"] == 0.0  # the paper's IRECE re-noises every request


def test_two_shape_scenes_lose_the_target_and_keep_the_other(pipe, judge, threshold):
    s = BenchSettings(n=10, seed=TEST_SEED)
    rows = gate_bench.pairs(pipe, judge, 10, s, gated(threshold))
    row = next(r for r in rows if r["gate"] == "contrastive")
    assert row["removed_and_kept"] >= FLOORS["pairs"], rows
    assert row["psnr_outside_mask_db"] >= FLOORS["psnr"], rows


def test_gated_masks_match_the_renderer(pipe, threshold):
    rng = np.random.default_rng(TEST_SEED)
    scenes = [shapes.render(shapes.CONCEPTS[i % 10], rng=rng) for i in range(20)]
    masks = masks_for(pipe, np.stack([s.image for s in scenes]), [s.label for s in scenes], D.tau, D.t_star, 25,
                      "contrastive", threshold)
    assert np.mean([iou(pixel_mask(m), s.mask) for m, s in zip(masks, scenes)]) >= FLOORS["iou"]
