"""The mini world: renderer truth, tokenizer, training code, committed model and judge."""
import types
from pathlib import Path
import zipfile

import numpy as np
import pytest
import torch

from miniworld import shapes
from miniworld.assets import MODEL_DIR
from miniworld.shapes import BACKGROUNDS, COLOURS, CONCEPTS

from .conftest import MODEL

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("concept", CONCEPTS)
def test_mask_matches_drawn_pixels(concept):
    for seed in range(5):
        scene = shapes.render(concept, seed=seed)
        img = scene.image.astype(float)
        fg = np.asarray(COLOURS[scene.shapes[0].colour], float)
        bg = np.asarray(BACKGROUNDS[scene.background], float)
        d_fg = np.linalg.norm(img - fg, axis=-1)
        d_bg = np.linalg.norm(img - bg, axis=-1)
        # inside the mask the pixel is nearer the shape colour, outside nearer the background
        # coverage >= 1/2 inside; uint8 rounding moves each distance by up to sqrt(3)/2
        assert (d_fg[scene.mask] <= d_bg[scene.mask] + 1.8).all()
        assert (d_bg[~scene.mask] <= d_fg[~scene.mask] + 1.8).all()
        # pixels well inside/outside are exactly the pure colours (no stray drawing)
        assert scene.mask.sum() > 20
        assert np.isclose(d_bg[~scene.mask], 0, atol=1.5).mean() > 0.9


def test_pair_masks_are_disjoint_and_each_drawn():
    for seed in range(20):
        scene = shapes.render_pair(seed=seed)
        (a, ma), (b, mb) = scene.masks.items()
        assert a != b and ma.sum() > 10 and mb.sum() > 10
        assert not (ma & mb).any()
        for s in scene.shapes:
            colour = np.asarray(COLOURS[s.colour], float)
            inside = scene.image[scene.masks[s.concept]].astype(float)
            assert np.linalg.norm(inside - colour, axis=-1).mean() < 60


def test_render_is_deterministic_and_concepts_distinct():
    a, b = shapes.render("star", seed=7), shapes.render("star", seed=7)
    assert np.array_equal(a.image, b.image)
    masks = [shapes.compose([shapes.Shape(c, "white", 16, 16, 10)], "black").mask for c in CONCEPTS]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.85, (CONCEPTS[i], CONCEPTS[j], iou)


def test_perturbations_change_the_image_but_not_its_ground_truth():
    """The black-box references' perturbations (noise, blur, JPEG) and the head's perturbed training scenes: pixels
    change, the shapes and their masks are the clean render's, and scene k is the same whatever n is drawn."""
    from miniworld import head
    im = shapes.render("star", seed=3).image
    for kind in shapes.PERTURBATIONS:
        out = shapes.perturb(im, kind, rng=np.random.default_rng(0))
        assert out.shape == im.shape and out.dtype == np.uint8
        diff = np.abs(out.astype(float) - im).mean()
        assert 0.5 < diff < 20, (kind, diff)  # visible, but the shape is still there
    # stronger settings change more
    assert np.abs(shapes.perturb(im, "blur", radius=1.2).astype(float) - im).mean() > \
        np.abs(shapes.perturb(im, "blur", radius=0.4).astype(float) - im).mean()
    with pytest.raises(ValueError, match="unknown perturbation"):
        shapes.perturb(im, "rotate")
    with pytest.raises(ValueError, match="rng"):
        shapes.perturb(im, "noise")
    scenes = head.scenes(64, seed=11)
    assert [(s.perturbation, s.background) for s in head.scenes(8, seed=11)] == \
        [(s.perturbation, s.background) for s in scenes[:8]]
    kinds = [s.perturbation for s in scenes]
    assert set(kinds) == {None, *shapes.PERTURBATIONS} and 0.3 < np.mean([k is not None for k in kinds]) < 0.7
    for s in scenes:
        clean = shapes.compose(s.shapes, s.background)
        assert clean.masks.keys() == s.masks.keys()
        assert all(np.array_equal(clean.masks[c], s.masks[c]) for c in s.masks)
        if s.perturbation is None or s.shapes:  # (blurring a plain background changes nothing)
            assert np.array_equal(clean.image, s.image) == (s.perturbation is None), s.perturbation


def _open_clip_reference():
    """open_clip's own SimpleTokenizer, loaded from the wheel the set-up downloads (not installed: it would
    pull torchvision)."""
    wheel = ROOT / ".cache" / "wheels" / "open_clip_torch-3.3.0-py3-none-any.whl"
    if not wheel.exists():
        pytest.skip("open_clip wheel not downloaded (make test fetches it)")
    with zipfile.ZipFile(wheel) as zf:
        src = zf.read("open_clip/tokenizer.py").decode()
        bpe = zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    tmp = ROOT / ".cache" / "open_clip_ref"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "bpe_simple_vocab_16e6.txt.gz").write_bytes(bpe)
    mod = types.ModuleType("open_clip_tokenizer_ref")
    mod.__file__ = str(tmp / "tokenizer.py")
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod.SimpleTokenizer(str(tmp / "bpe_simple_vocab_16e6.txt.gz"))


PROMPTS = ["a red star on a black background", "an image of a moon", "a photo of a cat",
           "A Purple ARROW, on a white background!", "a diamond and a ring", "", "photorealistic crescent-moon"]


def test_tokenizer_matches_real_clip_ids():
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    # ids of the real CLIP ViT-L/14 tokenizer (as used by SD v1.4)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    for c in CONCEPTS + tuple(COLOURS) + tuple(BACKGROUNDS):
        assert len(tok(c, add_special_tokens=False).input_ids) == 1, c


def test_tokenizer_matches_open_clip():
    from transformers import CLIPTokenizer
    ref = _open_clip_reference()
    tok = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    for p in PROMPTS + [s.prompt() for s in (shapes.render(seed=i) for i in range(30))]:
        assert tok(p, add_special_tokens=False).input_ids == ref.encode(p), p


def test_quick_training_run_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline
    from miniworld.train import train_world
    summary = train_world(tmp_path / "m", tmp_path / "judge.safetensors", tmp_path / "work", quick=True)
    assert summary["vae_scaling_factor"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    out = pipe("a star", num_inference_steps=2, output_type="np").images
    assert out.shape == (1, shapes.SIZE, shapes.SIZE, 3) and np.isfinite(out).all()
    assert (tmp_path / "judge.safetensors").stat().st_size > 0


def test_committed_model_folder_is_sd_layout():
    """The mini world's own folder (whatever IRECE_TEST_MODEL says): SD v1.x layout, DDIM on SD's betas."""
    import json
    idx = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert idx["_class_name"] == "StableDiffusionPipeline"
    assert idx["unet"] == ["diffusers", "UNet2DConditionModel"] and idx["vae"] == ["diffusers", "AutoencoderKL"]
    assert idx["text_encoder"] == ["transformers", "CLIPTextModel"]
    sched = json.loads((MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["beta_schedule"] == "scaled_linear"
    assert (sched["beta_start"], sched["beta_end"]) == (0.00085, 0.012)
    assert not list(MODEL_DIR.rglob("*.bin")) and not list(MODEL_DIR.rglob("*.pt"))
    assert json.loads((MODEL_DIR / "concepts.json").read_text()) == list(CONCEPTS)


@pytest.mark.shapes10_only
def test_judge_accuracy_on_held_out_renders(judge):
    from benchmarks.world_check import judge_accuracy
    assert judge_accuracy(judge, n=550) >= 0.98


@pytest.mark.shapes10_only
def test_diffusers_pipeline_images_are_accepted_by_the_judge(judge):
    """diffusers' own StableDiffusionPipeline on the committed folder draws what the prompt says."""
    from diffusers import StableDiffusionPipeline
    from miniworld.judge import classify
    sd = StableDiffusionPipeline.from_pretrained(MODEL)
    sd.set_progress_bar_config(disable=True)
    prompts = [f"a white {c} on a black background" for c in CONCEPTS] * 2
    gen = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = sd(prompts, num_inference_steps=25, guidance_scale=5.0, generator=gen, output_type="np").images
    labels, _ = classify(judge, (images * 255).round().astype(np.uint8))
    hits = [lab == c for lab, c in zip(labels, [c for c in CONCEPTS] * 2)]
    assert np.mean(hits) >= 0.85, list(zip(labels, prompts))
