"""The presence gates inside the pipeline (model-agnostic: any SD v1.x folder with a vocabulary)."""
import json

import numpy as np
import pytest
import torch

from irece_runtime import irece
from irece_runtime.irece import IreceConfig
from irece_runtime.calls import drive
from irece_runtime.pipeline import Request


@pytest.fixture(scope="module")
def vocab(pipe):
    if len(pipe.vocabulary) < 2:
        pytest.skip("the model folder has no concepts.json with two or more concepts to contrast")
    return pipe.vocabulary


def test_contrast_set_puts_operator_concepts_first_without_repeats(pipe, vocab):
    cfg = IreceConfig(concepts=(vocab[-1], "dragon"), vocabulary=("castle", vocab[-1]))
    s = pipe.contrast_set(cfg)
    assert s[:3] == (vocab[-1], "dragon", "castle")
    assert len(s) == len(set(s)) and set(vocab) <= set(s)


def test_classifier_gate_below_threshold_leaves_the_image_bit_identical_and_skips_the_localizer(pipe, vocab,
                                                                                                  monkeypatch):
    req = Request(prompt=f"a {vocab[1]}", steps=6, seed=3)
    off = pipe.generate(req)
    calls = []
    real = pipe.backend.concept_map
    monkeypatch.setattr(pipe.backend, "concept_map", lambda *a: calls.append(1) or real(*a))
    gated = pipe.generate(req, IreceConfig(concepts=(vocab[0],), gate="classifier", threshold=1.01, t_star=2))
    assert np.array_equal(off.uint8(), gated.uint8()) and not calls  # no localizer pass: nothing to mask
    (c,) = gated.irece.concepts
    assert not c.intervened and c.mask_area == 0.0
    assert 0.0 <= c.score <= 1.0 and c.threshold == pytest.approx(1.01)
    report = json.loads(json.dumps(gated.irece.to_dict(), allow_nan=False))  # strict JSON: no map, peak null
    assert report["concepts"][0]["peak"] is None and report["concepts"][0]["score"] == pytest.approx(c.score)


def test_classifier_gate_at_zero_threshold_masks_like_the_paper(pipe, vocab):
    """Every target passes a zero threshold: the masks are then exactly the paper's (own prompt, min-max, tau)."""
    x = torch.randn(2, pipe.backend.latent_channels, pipe.sample_size, pipe.sample_size,
                    generator=torch.Generator().manual_seed(0))
    t = pipe.scheduler(6).timesteps[2]
    targets = [(c, 0.4, 0.0) for c in vocab[:2]]
    paper, _ = pipe.localize(x, t, IreceConfig(concepts=tuple(vocab[:2])), targets)
    # (every t' scored, so the reports carry the full scores: with the early exit one t' settles a zero threshold)
    union, reports = pipe.localize(x, t, IreceConfig(concepts=tuple(vocab[:2]), gate="classifier",
                                                     classifier_early_exit=False), targets)
    assert torch.equal(union, paper) and all(r.intervened for r in reports)
    scores = pipe.presence(x, t, IreceConfig(concepts=tuple(vocab[:2]), gate="classifier"))
    assert scores.shape == (2, len(pipe.contrast_set(IreceConfig(concepts=tuple(vocab[:2])))))
    assert torch.allclose(scores.sum(1), torch.ones(2), atol=1e-5)
    assert [r.score for r in reports] == pytest.approx([float(scores[:, i].max()) for i in range(2)])


@pytest.mark.parametrize("threshold", [0.0, 1.01])
def test_classifier_gate_stops_at_the_t_prime_that_settles_its_decisions_and_decides_as_the_full_gate(
        pipe, vocab, monkeypatch, threshold):
    """Every score reaches 0 and none reaches 1.01: the first t' settles the decision, so the gate runs its x0 row
    and one t' (2 standard-UNet calls instead of 1 + 3), and the image, mask and decision are the full gate's."""
    req = Request(prompt=f"a {vocab[0]}", steps=6, seed=3)
    calls = []
    real = pipe.backend.eps
    monkeypatch.setattr(pipe.backend, "eps", lambda model, *a: calls.append(model) or real(model, *a))
    out, standard_calls = {}, {}
    for early in (True, False):
        calls.clear()
        out[early] = pipe.generate(req, IreceConfig(concepts=(vocab[0],), gate="classifier", threshold=threshold,
                                                    t_star=2, classifier_early_exit=early))
        standard_calls[early] = calls.count("standard")
    assert standard_calls == {True: 2, False: 1 + len(IreceConfig().classifier_timesteps)}
    assert np.array_equal(out[True].uint8(), out[False].uint8())
    (a,), (b,) = out[True].irece.concepts, out[False].irece.concepts
    assert a.intervened == b.intervened == (threshold == 0.0) and a.mask_area == b.mask_area
    assert (a.score >= threshold) == (b.score >= threshold)


@pytest.mark.shapes10_only
def test_classifier_gate_names_the_shape_an_inverted_render_shows(pipe, vocab):
    """The correctness anchor is the renderer: a render of each concept, DDIM-inverted with the null prompt and
    scored at t* = 0.5, must put that concept first (held-out AUC on single shapes 0.99, BENCHMARKS.md)."""
    from benchmarks import batch as gen
    from benchmarks.presence import latents_at
    from miniworld import shapes
    rng = np.random.default_rng(7_600_000)  # neither the calibration's nor the benchmarks' seeds
    renders = np.stack([shapes.render(c, rng=rng).image for c in shapes.CONCEPTS])
    x = gen.invert_images(pipe, renders, "standard", 25)
    uncond = pipe.encode_prompt("")
    cfg = IreceConfig(gate="classifier", t_star=0.5)
    x_t, t = latents_at(pipe, x, uncond, uncond, 5.0, 25, cfg.step_index(25))
    scores = pipe.presence(x_t, t, cfg)
    concepts = pipe.contrast_set(cfg)
    top = [concepts[int(i)] for i in scores.argmax(1)]
    assert sum(a == b for a, b in zip(top, shapes.CONCEPTS)) >= 8, list(zip(shapes.CONCEPTS, top))


def test_classifier_gate_runs_one_unet_call_per_re_noising_timestep(pipe, vocab, monkeypatch):
    x = torch.randn(1, pipe.backend.latent_channels, pipe.sample_size, pipe.sample_size,
                    generator=torch.Generator().manual_seed(1))
    t = pipe.scheduler(6).timesteps[3]
    rows = []
    real = pipe.backend.eps
    monkeypatch.setattr(pipe.backend, "eps", lambda m, s, ts, h: rows.append((m, s.shape[0])) or real(m, s, ts, h))
    for ts in ((300,), (100, 300, 500)):
        rows.clear()
        cfg = IreceConfig(concepts=(vocab[0],), gate="classifier", classifier_timesteps=ts)
        pipe.presence(x, t, cfg)
        k = len(pipe.contrast_set(cfg))
        assert rows == [("standard", 1)] + [("standard", k + 1)] * len(ts)  # x0, then K concepts + null per t'


def test_a_gate_that_never_fires_leaves_a_batch_of_latents_exactly_as_irece_off(pipe, vocab):
    """Not just equal pixels: equal latents, for a whole batch. A DDIM-inverted latent comes out of the inversion
    loop laid out channels_last, and keeps that layout through denoising; a re-laid-out copy of it denoised a pixel
    level apart (3 of 16 benign inverted renders on the committed world were not bit-identical)."""
    x = torch.randn(16, pipe.backend.latent_channels, pipe.sample_size, pipe.sample_size,
                    generator=torch.Generator().manual_seed(11)).contiguous(memory_format=torch.channels_last)
    null = pipe.encode_prompt("")
    off, _ = pipe.denoise(x, null, null, 5.0, 25)
    on, report = pipe.denoise(x, null, null, 5.0, 25, IreceConfig(concepts=(vocab[0],), gate="classifier",
                                                                   threshold=1.01, t_star=12))
    assert report is not None and not report.intervened
    assert torch.equal(on, off)


def test_classifier_reads_the_conditioning_in_its_own_t_prime_call_and_the_erased_unets(pipe, vocab, monkeypatch):
    """Each t' call carries K + 1 rows per image (each concept's prompt, null) and, reading the conditioning, one more
    per image; the erased UNet reads it in a call of its own; one score per concept."""
    rows = []
    real = pipe.backend.eps
    monkeypatch.setattr(pipe.backend, "eps",
                        lambda model, x, t, h: rows.append((model, x.shape[0])) or real(model, x, t, h))
    k = len(pipe.contrast_set(IreceConfig(concepts=(vocab[0],))))
    cfg = IreceConfig(concepts=(vocab[0],), gate="classifier", t_star=2, classifier_timesteps=(300,),
                      conditioning="null")
    x = torch.randn(2, pipe.backend.latent_channels, pipe.sample_size, pipe.sample_size,
                    generator=torch.Generator().manual_seed(3))
    t = pipe.scheduler(6).timesteps[2]
    scores, carried = drive(pipe.presence_steps(x, t, cfg, pipe.encode_prompt(f"a {vocab[0]}")), pipe.backend)
    # the default reader of the conditioning is "both": 2 more standard rows in the t' call, and the erased UNet's call
    assert rows == [("standard", 2), ("standard", 2 * (k + 1) + 2), ("erased", 2)]
    assert scores.shape == (2, k) and carried.shape == (2, k)
    assert ((scores >= 0) & (scores <= 1 + 1e-6)).all()
