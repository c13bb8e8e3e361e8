"""`irece bench crr --ray`: the CRR table's cells as Ray tasks (benchmarks/ray_sweep.py) give the sequential run's
table. Skipped only where ray is not installed (`pip install -e '.[ray]'`)."""
import json

import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]' (the ray extra)")

from benchmarks import cache, crr  # noqa: E402


@pytest.mark.slow
@pytest.mark.shapes10_only
def test_crr_cells_on_ray_equal_the_sequential_run(tmp_path, monkeypatch):
    """Two cells (standard, uce on star) as Ray tasks at once, each cache fresh: the table equals the sequential
    run's cell for cell; the tasks made their artifacts in the cache given (the driver made none), the ti_black
    embedding both cells need included, and the driver cached the cells so a rerun resumes past them."""
    assert not ray.is_initialized(), "a Ray instance left running (its CPUs taken) would hold the tasks forever"
    s = crr.BenchSettings(n=2, n_preserve=1, steps=4, erase_steps=2, ti_steps=2)
    kw = dict(concepts=["star"], methods=["standard", "uce"], scenarios=("text", "ti_black", "inv_white_null"), s=s,
              log=lambda *a: None)
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "sequential")
    sequential = crr.run(**kw)
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "ray")
    monkeypatch.setattr(crr, "load_judge", lambda *a: pytest.fail("the driver judged: a cell ran here, not on Ray"))
    on_ray = crr.run(**kw, ray="local", ray_cpus=2, ray_threads=torch.get_num_threads())
    for part in ("rows", "quality", "preservation", "controls", "settings"):
        assert json.dumps(on_ray[part]) == json.dumps(sequential[part]), part  # NaN-safe, order included
    assert len(on_ray["rows"]) == 2 * 3 * len(crr.DEFENCES) and on_ray["controls"]
    made = {kind: len(list((tmp_path / "ray" / kind).glob("*"))) for kind in ("erased", "ti", "inverted", "cell")}
    assert made == {"erased": 1, "ti": 1, "inverted": 2, "cell": 2}, made
    assert not list((tmp_path / "ray").rglob("*.tmp"))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started though every cell is cached"))
    again = crr.run(**kw, ray="local")
    assert json.dumps(again["rows"]) == json.dumps(sequential["rows"])
