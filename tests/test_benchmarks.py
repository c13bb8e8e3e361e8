"""Benchmark arithmetic, the backend interface the benchmarks run on, and every scenario wired through on a tiny
smoke run."""
import argparse
import json
import math
import types
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import stats
from irece_runtime import irece
from irece_runtime.irece import IreceConfig
from irece_runtime.pipeline import Pipeline

from .conftest import MODEL, model_image


def test_crr_counts_the_concept_label():
    assert stats.crr(["star", "moon", "star", "none"], "star") == 0.5
    assert math.isnan(stats.crr([], "star"))


def test_a_cells_key_changes_with_a_later_field_only_when_it_is_set():
    """Fields IreceConfig gained after cells were cached leave the key as it was at their defaults (finished cells
    stay valid), and change it when set (a cell computed with them is not mistaken for one without)."""
    from benchmarks import crr
    cfg = IreceConfig(concepts=("star",), gate="classifier", t_star=0.5)
    key = crr.config_key(cfg)
    for name in crr.LATER_FIELDS:
        assert f"{name}=" not in key
    expected = repr(cfg)
    for name in crr.LATER_FIELDS:
        expected = expected.replace(f", {name}={getattr(cfg, name)!r}", "")
    from irece_runtime import stages
    if stages.REVISION > 1:  # what the stages do changed under the same fields: cells of the old behaviour are stale
        expected = expected[:-1] + f", revision={stages.REVISION})"
    assert key == expected and "conditioning_unet=" in key  # only the later fields are left out
    for name in crr.LATER_FIELDS:
        if name == "keep_others":  # valid only beside keep_outside and the head gate
            kept = replace(cfg, gate="head", keep_outside=True)
            assert crr.config_key(replace(kept, keep_others=True)) != crr.config_key(kept)
            continue
        if name == "recheck_threshold":  # one a recheck look
            looked = replace(cfg, recheck=(0.7,))
            assert crr.config_key(replace(looked, recheck_threshold=(0.5,))) != crr.config_key(looked)
            continue
        other = {"grow": 1, "negative_guidance": 3.0, "negative_guidance_steps": 6, "negative_guidance_every": 3}.get(
            name, not getattr(cfg, name))
        assert crr.config_key(replace(cfg, **{name: other})) != key
    assert crr.config_key(replace(cfg, tau=0.3)) != key and crr.config_key(None) == "None"
    # the same for the bench's own settings gained later (the gated defences' gate and grow)
    s = crr.BenchSettings(n=4)
    assert set(crr.settings_key(s)) == set(s.__dict__) - set(crr.LATER_SETTINGS)
    assert crr.settings_key(replace(s, gate="head"))["gate"] == "head" and crr.settings_key(replace(s, grow=1))
    assert crr.settings_key(replace(s, negative_guidance=3.0))["negative_guidance"] == 3.0


def test_crr_gated_defences_take_the_benchs_gate_and_grow_and_the_paper_neither():
    from benchmarks import crr
    s = crr.BenchSettings(gate="head", grow=1, threshold=0.7, t_star=0.5, tau=0.2, negative_guidance=3.0,
                          negative_guidance_steps=6)
    paper, gated, recheck = (crr.defence_config(d, "star", s) for d in ("irece-paper", "irece-gated",
                                                                         "gated+recheck"))
    assert (paper.gate, paper.grow, paper.recheck, paper.tau) == ("off", 0, (), 0.4)  # the paper's tau, whatever s's
    assert paper.negative_guidance == paper.negative_guidance_steps == 0  # nor its loop
    assert (gated.gate, gated.grow, gated.threshold, gated.recheck, gated.tau) == ("head", 1, 0.7, (), 0.2)
    assert gated.negative_guidance == recheck.negative_guidance == 3.0
    assert gated.negative_guidance_steps == recheck.negative_guidance_steps == 6
    assert recheck.recheck == irece.RECHECK and recheck.conditioning == "keep" and recheck.gate == "head"
    full = crr.defence_config("full", "star", s)  # the head drops a learned embedding where it saw the target
    assert (full.gate, full.conditioning, full.recheck) == ("head", "null", irece.RECHECK)
    with pytest.raises(ValueError, match="conditioning 'null'"):  # a gate is needed to say where
        crr.defence_config("full", "star", replace(s, gate="off"))


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
    rows = [{"method": "uce", "scenario": "text", "defence": "none", "k": 1, "n": 4},
            {"method": "uce", "scenario": "text", "defence": "none", "k": 3, "n": 4},
            {"method": "uce", "scenario": "text", "defence": "irece-paper", "k": 0, "n": 4}]
    p = pooled(rows, method="uce", defence="none")
    assert p["crr"] == 0.5 and p["n"] == 8 and p["ci95"] == list(stats.wilson(4, 8))


@pytest.mark.slow
@pytest.mark.shapes10_only
def test_every_scenario_and_method_wired_through(tmp_path, monkeypatch):
    from benchmarks import cache, crr, report
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    s = crr.BenchSettings(n=2, n_preserve=1, steps=4, erase_steps=2, ti_steps=2)
    res = crr.run(concepts=["star"], s=s, log=lambda *a: None)
    cells = {(r["method"], r["scenario"], r["defence"]) for r in res["rows"]}
    assert cells == {(m, sc, d) for m in crr.METHODS for sc in crr.SCENARIOS for d in crr.DEFENCES}
    for r in res["rows"]:  # each row is the judge's count on its own n images
        assert r["n"] == 2 and r["concept"] == "star" and 0 <= r["k"] <= 2
        assert r["crr"] == r["k"] / 2 and r["ci95"] == list(stats.wilson(r["k"], 2))
    # the paper's IRECE masked something in every scenario (it always intervenes); the gated one may not
    assert len(res["quality"]) == 2 * len(crr.METHODS) * len(crr.SCENARIOS)
    assert all(0 < q["mask_area"] < 1 for q in res["quality"] if q["defence"] == "irece-paper"), res["quality"]
    assert all(0 <= q["mask_area"] < 1 for q in res["quality"])
    # the control, aimed at another concept, for both IRECE variants
    assert {(c["method"], c["defence"]) for c in res["controls"]} == {(m, d) for m in crr.METHODS
                                                                      for d in crr.DEFENCES[1:]}
    assert all(c["localized"] != "star" for c in res["controls"])
    assert len(res["preservation"]) == len(crr.DEFENCES) * len(crr.METHODS)
    assert all(p["n"] == 9 for p in res["preservation"])  # one prompt per other concept
    md = report.crr_markdown(res)
    assert "| receler |" in md and "inv_white_null" in md
    report.crr_chart(res, tmp_path / "crr.png")
    assert (tmp_path / "crr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun reads each finished (method, concept) cell back and computes nothing
    cell_files = set((tmp_path / "cache" / "cell").glob("*.json"))
    assert len(cell_files) == len(crr.METHODS)
    read = []
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: read.append(self) or read_text(self, *a, **k))

    def recomputed(*a, **k):
        raise AssertionError("a cached cell was computed again")
    for name in ("load_pipeline", "erased_unet", "scenario_images"):
        monkeypatch.setattr(crr, name, recomputed)
    again = crr.run(concepts=["star"], s=s, log=lambda *a: None)
    assert cell_files <= set(read)
    for k in ("rows", "quality", "preservation", "controls", "settings"):
        assert again[k] == res[k], k


@pytest.mark.shapes10_only
def test_bench_artifacts_are_made_once_and_read_back(pipe, tmp_path, monkeypatch):
    """Erased UNets, textual-inversion vectors, Ring-A-Bell prompts and inverted latents are cached by content: a
    second request reads the file instead of calling the maker; a different input makes a new artifact."""
    import erasure.methods
    from benchmarks import attacks, batch, cache, crr
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    calls = Counter()

    def counted(name, fn, **fixed):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **(k | fixed))
        return wrapper
    monkeypatch.setattr(erasure.methods, "erase", counted("erase", erasure.methods.erase))
    monkeypatch.setattr(attacks, "textual_inversion", counted("ti", attacks.textual_inversion))
    monkeypatch.setattr(attacks, "ring_a_bell", counted("ring_a_bell", attacks.ring_a_bell, iters=3, candidates=8))
    monkeypatch.setattr(batch, "invert_images", counted("invert", batch.invert_images))
    s = crr.BenchSettings(n=2, steps=3, erase_steps=2, ti_steps=2)

    def make(s):
        m = str(MODEL)
        return (crr.erased_unet(m, "uce", "star", s), crr.ti_embedding(pipe, m, None, "standard", "star", s),
                crr.adv_prompt(pipe, m, "star", s), crr.inverted(pipe, m, None, "star", "standard", False, s))
    first, second = make(s), make(s)
    assert calls == {"erase": 1, "ti": 1, "ring_a_bell": 1, "invert": 1}
    assert first[0] == second[0] and (Path(first[0]) / "config.json").exists()
    assert torch.equal(first[1], second[1]) and first[2] == second[2] and torch.equal(first[3], second[3])
    # the inversion's trajectory (keep_outside) comes back from the same cached file: input first, x_T last
    x_T, trajectory = crr.inversion(pipe, str(MODEL), None, "star", "standard", False, s)
    assert calls["invert"] == 1 and len(trajectory) == s.steps + 1 and torch.equal(trajectory[-1], x_T)
    make(replace(s, seed=1))  # every spec names the seed
    assert calls == {"erase": 2, "ti": 2, "ring_a_bell": 2, "invert": 2}


def test_a_new_concept_head_keeps_the_diffusion_models_artifacts_but_not_the_cells(tmp_path):
    """Erasures, TI vectors and inversions are keyed on the diffusion weights alone (head=False): a new concept head
    does not make them again; cells and policy rows (which run the head) still change with it."""
    from safetensors.torch import save_file

    from benchmarks.cache import model_fingerprint

    (tmp_path / "unet").mkdir()
    (tmp_path / "concept_head").mkdir()
    save_file({"w": torch.ones(3)}, str(tmp_path / "unet" / "m.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "concept_head" / "head.safetensors"))
    fingerprint = model_fingerprint.__wrapped__  # (the benches' one is cached per process)
    weights, whole = fingerprint(str(tmp_path), head=False), fingerprint(str(tmp_path))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "concept_head" / "head.safetensors"))
    assert fingerprint(str(tmp_path), head=False) == weights and fingerprint(str(tmp_path)) != whole
    save_file({"w": torch.zeros(3)}, str(tmp_path / "unet" / "m.safetensors"))
    assert fingerprint(str(tmp_path), head=False) != weights


def test_text_encoder_checkpoint_in_sd_layout():
    """SD v1.4's `text_model.` key layout: transformers 4.x (optimum's stack) would otherwise load random weights."""
    from safetensors import safe_open

    with safe_open(str(MODEL / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)


def test_peers_side_by_side_do_the_same_work(tmp_path):
    """diffusers, optimum (when its virtualenv is there: `make test` builds it) and our backends, interleaved:
    with IRECE off every system must draw diffusers' image from the same seed; IRECE on must change it."""
    from benchmarks import peers

    res = peers.run(MODEL, steps=3, n=2, warmup=1, n_check=2, out_dir=tmp_path, progress=False)
    rows = {r["system"]: r for r in res["rows"]}
    expected = {"diffusers", "irece torch", "irece torch +IRECE", "irece onnx", "irece onnx +IRECE"}
    if peers.PEERS_PYTHON.exists():
        expected.add("optimum")
        assert "irece_onnx_irece_on_over_optimum_p50" in res["verdict"]
        assert res["versions"]["optimum"]["transformers"].startswith("4.")
    else:  # said, not silently dropped
        assert "make peers-env" in res["skipped"]["optimum"]
    assert set(rows) == expected
    base = rows["diffusers"]["p50_ms"]
    for name, r in rows.items():
        assert r["n"] == 2 and r["peak_rss_mb"] > 50, name  # each worker holds a loaded model
        assert r["p50_vs_diffusers"] == pytest.approx(r["p50_ms"] / base), name
        if r["irece"]:
            assert r["vs"] == name.removesuffix(" +IRECE") and r["mean_abs_diff_255"] > 1.0, name
        else:
            assert r["vs"] == "diffusers" and r["max_abs_diff_255"] <= 2.0, (name, r["max_abs_diff_255"])
    md = peers.markdown(res)
    assert all(f"| {name} |" in md for name in rows)


def test_latency_statistics_of_known_timings():
    from benchmarks.peers import _stats
    s = _stats([40.0, 10.0, 100.0, 30.0, 20.0])
    assert s["p50_ms"] == 30.0 and s["p95_ms"] == pytest.approx(88.0)  # numpy's linear interpolation: 40 + 0.8 * 60
    assert s["mean_ms"] == 40.0 and s["throughput_rps"] == 25.0 and s["n"] == 5


def test_peers_erased_folder_is_the_erased_unet_for_diffusers(tmp_path, monkeypatch):
    """diffusers and optimum get a model folder whose UNet is the erased one and whose other parts are ours."""
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks import cache, peers
    from irece_runtime.components import load_unet
    from irece_runtime.erasers import ERASERS_FILE
    from erasure.methods import erase

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


class InterfaceOnly:
    """The backend interface and nothing else (what the ONNX Runtime and TensorRT backends offer), over a torch
    backend: a benchmark that reaches past the interface fails here with AttributeError."""

    def __init__(self, backend):
        self._b = backend
        for k in ("device", "embed_dim", "latent_channels", "vae_scale_factor", "limits"):
            setattr(self, k, getattr(backend, k))

    def embed_tokens(self, ids):
        return self._b.embed_tokens(ids)

    def encode_text(self, embeds):
        return self._b.encode_text(embeds)

    def eps(self, model, sample, timestep, hidden):
        return self._b.eps(model, sample, timestep, hidden)

    def concept_map(self, sample, timestep, hidden, token_weights):
        return self._b.concept_map(sample, timestep, hidden, token_weights)

    def vae_encode(self, images):
        return self._b.vae_encode(images)

    def vae_decode(self, latents):
        return self._b.vae_decode(latents)


def test_batched_generation_and_ring_a_bell_need_only_the_backend_interface(pipe):
    from benchmarks import attacks, batch
    p = Pipeline(InterfaceOnly(pipe.backend), pipe.tokenizer, pipe.scheduler_config, pipe.sample_size, pipe.vocabulary)
    side = pipe.sample_size * pipe.backend.vae_scale_factor
    cfg = IreceConfig(concepts=("star",))
    images, masks = batch.from_prompts(p, ["a star", "a moon"], [0, 1], cfg, steps=3)
    assert images.shape == (2, side, side, 3) and images.dtype == np.uint8
    assert masks.shape == (2, pipe.sample_size, pipe.sample_size) and masks.any()
    # the same images as the full torch backend: nothing was skipped
    assert np.array_equal(images, batch.from_prompts(pipe, ["a star", "a moon"], [0, 1], cfg, steps=3)[0])
    x_T = batch.invert_images(p, model_image(pipe, "star", seed=0)[None], "standard", steps=3)
    assert x_T.shape == (1, pipe.backend.latent_channels, pipe.sample_size, pipe.sample_size)
    images, _ = batch.from_latents(p, x_T, "", None, steps=3)
    assert images.shape == (1, side, side, 3)
    prompt = attacks.ring_a_bell(p, "star", n_tokens=3, iters=2, candidates=4)
    ids = pipe.tokenizer(prompt, add_special_tokens=False).input_ids
    assert prompt and not set(pipe.tokenizer("star", add_special_tokens=False).input_ids) & set(ids)


def test_gradient_attacks_refuse_other_backends_clearly():
    from benchmarks import attacks
    from irece_runtime.backends.graph import GraphBackend
    not_torch = types.SimpleNamespace(backend=GraphBackend())
    with pytest.raises(ValueError, match="textual inversion needs the torch backend.*got GraphBackend"):
        attacks.textual_inversion(not_torch, "erased", "star")


def test_bench_defaults_are_irece_defaults():
    from benchmarks import cli, crr
    d = IreceConfig.defaults()
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    for verb in ("crr", "localization"):
        a = parser.parse_args(["bench", verb])
        assert (a.tau, a.t_star) == (d.tau, d.t_star), verb
    assert (crr.BenchSettings().tau, crr.BenchSettings().t_star) == (d.tau, d.t_star)
    # t* is parsed as IRECE parses it everywhere: a fraction, or a step index
    t = parser.parse_args(["bench", "crr", "--t-star", "7"]).t_star
    assert t == 7 and isinstance(t, int)
    assert parser.parse_args(["bench", "localization", "--t-star", "0.25"]).t_star == 0.25
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "crr", "--t-star", "soon"])


def test_bench_serve_rows_for_every_mode_and_client_count(tmp_path, capsys):
    """`irece bench serve` end to end at a toy size: both servers as processes and the Ray Serve deployment, every
    (mode, client count) row with the fields the issue names, the batched servers' batches counted from their
    metrics (Ray's: summed over both replicas' series), the ratios against the unbatched server."""
    from irece_cli.main import main
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--backends", "torch", "--clients", "1", "3", "--requests", "3", "--steps", "2",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert {(r["mode"], r["clients"]) for r in rows} == {(m, c) for m in ("batched", "unbatched", "ray") for c in (1, 3)}
    for r in rows:
        assert set(r) >= {"mode", "backend", "clients", "rps", "p50_ms", "p95_ms", "mean_batch"}
        assert r["backend"] == "torch" and r["codes"] == {"OK": r["requests"]} and r["rps"] > 0
        assert r["p95_ms"] >= r["p50_ms"] > 0
    assert all(r["mean_batch"] == 1.0 for r in rows if r["mode"] == "unbatched")
    assert all(r["mean_batch"] >= 1.0 for r in rows if r["mode"] in ("batched", "ray"))
    assert set(res["ratios"]["torch: batched / unbatched"]) == {"rps_1_clients", "rps_3_clients", "p50_1_client"}
    # request n is the same request at every client count: the 3-client batched images against the same requests
    # served alone (the unbatched server), within the documented bound
    same = res["determinism"]["torch"]
    assert same["batched"]["compared"] == 12 and same["batched"]["max_abs_diff_255"] <= 1
    assert same["ray"]["compared"] == 12 and same["ray"]["max_abs_diff_255"] <= 1
    assert same["unbatched across client counts"]["max_abs_diff_255"] == 0
    assert "| torch | batched | 3 |" in capsys.readouterr().out


def test_crr_markdown_names_the_negative_guidance_of_the_gated_rows():
    """A table whose gated rows were steered away from the concept says so (and for how many steps)."""
    from benchmarks import report
    rows = [{"method": "uce", "scenario": "text", "defence": d, "concept": "star", "crr": 0.5, "n": 2, "k": 1,
             "ci95": [0.1, 0.9]} for d in ("none", "irece-gated")]
    res = {"rows": rows, "quality": [], "preservation": [], "controls": [],
           "settings": {"tau": 0.2, "gate": "head", "grow": 1, "negative_guidance": 0.0}}
    assert "negative guidance" not in report.crr_markdown(res)
    res["settings"].update(negative_guidance=3.0)
    assert "negative guidance 3.0);" in report.crr_markdown(res)
    res["settings"].update(negative_guidance_steps=6)
    assert "negative guidance 3.0 for 6 steps);" in report.crr_markdown(res)


def test_bench_policy_quick_runs_every_part_with_the_paper_beside_the_policy(tmp_path, monkeypatch):
    """`irece bench policy --quick`: every part (CRR scenarios with the wrong-aim control, benign requests, two-shape
    scenes, the adaptive attacks aimed at the policy) in one JSON and one markdown table, the paper's policy a row of
    each; a second run is read from the cache."""
    from benchmarks import crr, policy
    from irece_cli.main import main
    monkeypatch.chdir(tmp_path)
    out, md = tmp_path / "policy.json", tmp_path / "policy.md"
    main(["bench", "policy", "--quick", "--json", str(out), "--markdown", str(md)])
    res = json.loads(out.read_text())
    assert set(policy.PARTS) <= set(res)
    defences = {r["defence"] for r in res["crr"]["rows"]}
    assert defences == {"none", "policy:paper", "policy:gated"}
    assert {r["scenario"] for r in res["crr"]["rows"]} == set(crr.SCENARIOS)
    assert {c["defence"] for c in res["crr"]["controls"]} == {"policy:paper", "policy:gated"}
    assert set(res["benign"][0]["identical"]) == {"paper", "gated"}
    assert {r["variant"] for r in res["pairs"]} >= {"paper", "gated"}
    assert res["adaptive"]["attacked"] == "policy:gated"
    assert {(r["attack"], r["defence"]) for r in res["adaptive"]["rows"]} == \
        {(a, d) for a in ("ti", "pgd", "pgd-bb", "prompt") for d in ("none", "policy:paper", "policy:gated")}
    text = md.read_text()
    assert "inversions pooled" in text and "Adaptive attacks aimed at the gated policy" in text
    first = res["seconds"]
    main(["bench", "policy", "--quick", "--json", str(out), "--parts", "crr", "benign", "adaptive"])
    assert json.loads(out.read_text())["seconds"] < first / 3  # cached cells, embeddings, attacks
