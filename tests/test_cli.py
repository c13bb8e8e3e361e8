"""The `irece` verbs other checks rely on print one JSON object with --json."""
import json

import numpy as np
import pytest
from PIL import Image

from irece_cli.main import main
from irece_runtime.irece import IreceReport
from miniworld.shapes import SIZE

from .conftest import MODEL, image_side, model_image


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_world_render_and_judge(tmp_path, capsys):
    out = run_json(capsys, ["world", "render", "--concept", "moon", "--seed", "4", "--out", str(tmp_path / "m.png"),
                            "--json"])
    assert out["label"] == "moon"
    mask = np.asarray(Image.open(out["mask"]))
    assert mask.shape == (SIZE, SIZE) and 20 < (mask > 0).sum() < 600
    run_json(capsys, ["world", "render", "--concept", "heart", "--seed", "1", "--out", str(tmp_path / "h.png"),
                      "--json"])
    res = run_json(capsys, ["world", "judge", str(tmp_path / "m.png"), str(tmp_path / "h.png"), "--json"])
    assert [r["label"] for r in res["results"]] == ["moon", "heart"]
    assert all(0.5 < r["p"] <= 1 for r in res["results"])


def test_generate_inverted_latent_with_irece(tmp_path, capsys, pipe):
    Image.fromarray(model_image(pipe, "star", seed=2)).save(tmp_path / "s.png")
    res = run_json(capsys, ["generate", "--model", str(MODEL), "--image", str(tmp_path / "s.png"), "--irece", "star",
                            "--steps", "10", "--t-star", "4", "--out", str(tmp_path / "o.png"), "--json"])
    assert res["modality"] == "inverted_latent" and res["irece"]["intervened"]
    assert 0 < res["irece"]["mask_area"] < 1
    # the report's one JSON form (IreceReport.to_dict), t* given as a step index
    assert list(res["irece"]) == list(IreceReport().to_dict()) and res["irece"]["step_index"] == 4
    assert list(res["irece"]["concepts"][0]) == ["concept", "mask_area", "peak", "intervened", "score", "threshold",
                                                "conditioning_score"]
    side = image_side(pipe)
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (side, side, 3)


def test_generate_without_irece_prints_the_empty_report(tmp_path, capsys):
    res = run_json(capsys, ["generate", "--model", str(MODEL), "--prompt", "a star", "--steps", "2",
                            "--out", str(tmp_path / "o.png"), "--json"])
    assert res["modality"] == "text" and res["irece"] == IreceReport().to_dict()


def test_generate_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(MODEL), "--prompt", "a star", "--irece", "star", "--tau", "3",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "tau" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse refuses a t* that is neither a fraction nor an index
        main(["generate", "--prompt", "a star", "--irece", "star", "--t-star", "0.3x",
              "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2 and "--t-star" in capsys.readouterr().err


def test_generate_keep_others_takes_the_head_gate_and_says_so_without_it(tmp_path, capsys, pipe):
    Image.fromarray(model_image(pipe, "star", seed=2)).save(tmp_path / "s.png")
    argv = ["generate", "--model", str(MODEL), "--image", str(tmp_path / "s.png"), "--irece", "star", "--steps", "10",
            "--t-star", "0.5", "--tau", "0.2", "--threshold", "0.217", "--grow", "1", "--keep-others",
            "--out", str(tmp_path / "o.png"), "--json"]
    # the paper's policy has no head to ask
    assert main(argv + ["--policy", "paper"]) == 2 and "keep_others" in capsys.readouterr().err
    res = run_json(capsys, argv + ["--policy", "paper", "--gate", "head"])  # --keep-others brings keep_outside
    assert res["modality"] == "inverted_latent" and res["irece"]["concepts"][0]["concept"] == "star"
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (image_side(pipe), image_side(pipe), 3)
