"""The `irece` verbs other checks rely on print one JSON object with --json."""
import json

import numpy as np
from PIL import Image

from irece_cli.main import main

from .conftest import MODEL


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_world_render_and_judge(tmp_path, capsys):
    out = run_json(capsys, ["world", "render", "--concept", "moon", "--seed", "4", "--out", str(tmp_path / "m.png"),
                            "--json"])
    assert out["label"] == "moon"
    mask = np.asarray(Image.open(out["mask"]))
    assert mask.shape == (32, 32) and 20 < (mask > 0).sum() < 600
    run_json(capsys, ["world", "render", "--concept", "heart", "--seed", "1", "--out", str(tmp_path / "h.png"),
                      "--json"])
    res = run_json(capsys, ["world", "judge", str(tmp_path / "m.png"), str(tmp_path / "h.png"), "--json"])
    assert [r["label"] for r in res["results"]] == ["moon", "heart"]
    assert all(0.5 < r["p"] <= 1 for r in res["results"])


def test_generate_inverted_latent_with_irece(tmp_path, capsys):
    run_json(capsys, ["world", "render", "--concept", "star", "--seed", "2", "--out", str(tmp_path / "s.png"), "--json"])
    res = run_json(capsys, ["generate", "--model", str(MODEL), "--image", str(tmp_path / "s.png"), "--irece", "star",
                            "--steps", "10", "--out", str(tmp_path / "o.png"), "--json"])
    assert res["modality"] == "inverted_latent" and res["irece"]["intervened"]
    assert 0 < res["irece"]["mask_area"] < 1
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (32, 32, 3)


def test_generate_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(MODEL), "--prompt", "a star", "--irece", "star", "--tau", "3",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "tau" in capsys.readouterr().err
