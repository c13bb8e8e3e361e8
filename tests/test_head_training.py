"""`irece head train` and `irece calibrate` from the model alone: the pure target rule, the masks against the renderer's
ground truth (the anchor), and the whole path on the mini model without the renderer or the judge."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from irece_runtime import head_training as ht
from irece_runtime.concept_head import HEAD_CONFIG, HEAD_DIR

from .conftest import MODEL

CONCEPTS = ("circle", "square", "star")


def test_prompt_items_name_distinct_concepts_and_are_the_same_for_any_n():
    items = ht.prompt_items(CONCEPTS, 40, seed=1)
    assert items[:10] == ht.prompt_items(CONCEPTS, 10, seed=1)
    assert {len(cs) for _, cs in items} == {0, 1, 2, 3}
    for prompt, named in items:
        assert len(set(named)) == len(named)
        assert prompt == " and ".join(f"a {c}" for c in named)  # "" for a background image


def test_the_foreground_is_split_into_regions_each_going_whole_to_its_lowest_error_concept():
    side = 5
    star, circle = torch.zeros(side, side), torch.zeros(side, side)
    star[0, 0], star[0, 1] = 1.0, 0.9  # region A: (0, 0), (0, 1)
    circle[3, 3], circle[4, 3], circle[4, 4] = 1.0, 0.8, 0.2  # region B: (3, 3), (4, 3); (4, 4) under tau
    maps = {(0, "star"): star, (0, "circle"): circle, (1, "square"): circle}
    err_star, err_circle = torch.ones(side, side), torch.ones(side, side)
    err_star[3, 3] = 0.1  # the star explains one cell of region B best ...
    err_circle[4, 3], err_circle[0, 0], err_circle[0, 1] = 0.0, 1.5, 1.5  # ... the circle the region as a whole
    errors = {(0, "star"): err_star, (0, "circle"): err_circle}
    y = ht.cell_targets(maps, errors, [("star", "circle"), ("square",), ()], CONCEPTS, side, tau=0.5)
    s, c, q = (CONCEPTS.index(n) for n in ("star", "circle", "square"))
    assert sorted(y[0, s].nonzero().tolist()) == [[0, 0], [0, 1]]
    assert sorted(y[0, c].nonzero().tolist()) == [[3, 3], [4, 3]]  # whole, though the star wins (3, 3) alone
    assert y[0, q].sum() == 0 and y[2].sum() == 0  # not named; a background image
    assert sorted(y[1, q].nonzero().tolist()) == [[3, 3], [4, 3]]  # one concept: all of its foreground


def test_calibration_labels_are_checked_by_the_model_on_both_sides():
    named = [frozenset({"circle"}), frozenset({"square"}), frozenset(), frozenset({"circle", "star"})]
    ranks = np.array([[0, 1, 5],   # circle first; square second, as high as a one-concept prompt's own: left out
                      [0, 3, 1],   # "a square" where the classifier ranks square 4th: the prompt is left out
                      [4, 6, 0],   # an empty prompt: the concept ranked first is left out, the others absent
                      [2, 0, 1]])  # both named within the top 3; square ranked first, above them: left out
    assert ht.labels(named, ranks, CONCEPTS) == [[True, None, False], None, [False, False, None], [True, None, True]]
    # unchecked: the prompts' labels as they are
    assert ht.labels(named, None, CONCEPTS) == [[True, False, False], [False, True, False], [False] * 3,
                                             [True, False, True]]


def test_the_heads_tau_is_scored_by_cell_iou_on_whole_chunks():
    kept = torch.tensor([True, False, True, True, False, False])  # two chunks of 3 items
    assert ht.chunk_rows(kept, batch=3, views=2) == [0, 4, 6]  # (text, inverted) rows per kept item
    target = torch.zeros(2, 2, 2, 2)
    target[0, 0, 0] = 1.0  # row 0, concept 0: the top row's two cells; nothing else has a target cell
    probs = torch.zeros(2, 2, 2, 2)
    probs[0, 0, 0, 0], probs[0, 0, 1, 1], probs[0, 0, 0, 1], probs[1, 1] = 0.9, 0.6, 0.3, 0.9
    assert ht.mask_iou(probs, target, 0.5).item() == pytest.approx(1 / 3)  # {(0,0), (1,1)} against {(0,0), (0,1)}
    assert ht.mask_iou(probs, target, 0.2).item() == pytest.approx(2 / 3)
    assert ht.mask_iou(probs, target, 0.95).item() == 0.0


def test_self_attention_propagation_leaves_the_noise_prediction_alone_and_averages(pipe):
    """The processors on attn1 record while a map is given and never change the UNet's output; each cell's value is
    a softmax-weighted mean of the map (a constant map stays that constant, a one-hot map gives weights in [0, 1])."""
    from irece_runtime.attention import SelfAttentionPropagation

    unet = pipe.backend.unets["standard"]
    side = pipe.sample_size
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    hidden = torch.cat([pipe.encode_prompt("a star"), pipe.null_hidden])
    t = torch.tensor(300)
    with torch.no_grad():
        before = unet(x, t, hidden).sample
        spread = SelfAttentionPropagation(unet)
        assert SelfAttentionPropagation(unet).store is spread.store  # installing twice shares one store
        maps = torch.zeros(2, 2, side, side)
        maps[:, 0] = 0.7
        maps[:, 1, 2, 3] = 1.0
        out = spread(x, t, hidden, maps)
        after = unet(x, t, hidden).sample
    assert torch.equal(before, after)
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 0.7), atol=1e-5)
    assert out[:, 1].min() >= 0 and out[:, 1].max() <= 1 and out[:, 1].sum() > 0
    assert not torch.allclose(out[0, 1], out[1, 1])  # the prompt and the image steer the attention


@pytest.mark.shapes10_only
def test_the_models_own_masks_find_rendered_shapes():
    """Anchor: on renders, the cells `irece head train` takes as targets (attention x contrast spread along
    self-attention, regions named by denoising error) overlap the renderer's own masks far above chance (the same
    masks against other renders' shapes). Measured 0.65 / 0.44 on 48 one- / two-shape renders (`irece bench
    localization --head-targets`, 0.42 / 0.37 before the spreading); floors 0.5 / 0.3."""
    from benchmarks.localization import head_targets

    res = head_targets(MODEL, n=16, n_pairs=16)
    assert res["single_iou"] >= 0.5 and res["single_iou"] > 2 * res["single_chance_iou"], res
    assert res["pairs_iou"] >= 0.3 and res["pairs_iou"] > 2 * res["pairs_chance_iou"], res


@pytest.mark.shapes10_only
def test_the_label_check_keeps_a_prompt_naming_the_rendered_shape_and_drops_one_naming_another(pipe):
    """Anchor: renders with their true label pass the model's check, the same renders labelled with another shape
    mostly do not (the check reads x_t late in the schedule, as on a generation)."""
    from irece_runtime import irece
    from irece_runtime.images import to_tensor
    from miniworld import shapes

    rng = np.random.default_rng(78)
    scenes = [shapes.render(shapes.CONCEPTS[i % 10], rng=rng) for i in range(20)]
    with torch.no_grad():
        x0 = pipe.backend.vae_encode(to_tensor(np.stack([sc.image for sc in scenes])))
        t = pipe.scheduler(25).timesteps[int(round(ht.CHECK_AT * 25))]
        x_t = irece.renoise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), pipe.alphas_cumprod[t])
        concepts = tuple(shapes.CONCEPTS)
        right = ht.checked(pipe, x_t, t, [(sc.label,) for sc in scenes], concepts)
        wrong = ht.checked(pipe, x_t, t, [(concepts[(concepts.index(sc.label) + 3) % 10],) for sc in scenes], concepts)
    assert np.mean(right) >= 0.8 and np.mean(wrong) <= 0.3, (np.mean(right), np.mean(wrong))


def _operator_folder(folder, pictures: dict, masks: dict):
    """Pictures {name: uint8 (64, 64, 3)} and masks {(name, concept): bool (64, 64)} in the --images layout."""
    from PIL import Image

    (folder / ht.MASKS).mkdir(parents=True)
    for name, picture in pictures.items():
        Image.fromarray(picture).save(folder / f"{name}.png")
    for (name, concept), mask in masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / ht.MASKS / f"{name}.{concept}.png")
    return folder


def test_operator_images_give_each_cell_the_share_its_masks_cover_and_refuse_what_they_cannot_read(tmp_path):
    square = np.zeros((64, 64), bool)
    square[:12, :16] = True  # cells (0, 0) and (0, 1) whole, (1, 0) and (1, 1) half (8 x 8 pixels a cell)
    picture = np.full((64, 64, 3), 40, np.uint8)
    folder = _operator_folder(tmp_path / "ok", {"scene": picture, "empty": picture}, {("scene", "square"): square})
    got = {name: cover for name, _, cover in ht.operator_images(folder, CONCEPTS, 64, 8)}
    assert set(got) == {"scene", "empty"} and not got["empty"].any()
    cover = got["scene"][CONCEPTS.index("square")]
    assert cover[0, :2].tolist() == [1.0, 1.0] and cover[1, :2].tolist() == [0.5, 0.5] and cover.sum() == 3.0
    assert not got["scene"][CONCEPTS.index("circle")].any()
    bad = _operator_folder(tmp_path / "bad", {"scene": picture}, {("scene", "dog"): square})
    with pytest.raises(ValueError, match=r"scene\.dog\.png names 'dog'"):
        ht.operator_images(bad, CONCEPTS, 64, 8)
    orphan = _operator_folder(tmp_path / "orphan", {"scene": picture}, {("other", "square"): square})
    with pytest.raises(ValueError, match="has no picture other"):
        ht.operator_images(orphan, CONCEPTS, 64, 8)
    with pytest.raises(ValueError, match="no .png or .jpg"):
        ht.operator_images(tmp_path, CONCEPTS, 64, 8)


def test_head_train_and_calibrate_run_from_the_model_alone_without_the_renderer(tmp_path):
    """The whole renderer-free path on the model under test (the mini model), in a fresh process: `irece head train` writes a head for the
    named concepts, `irece calibrate` its block; neither imports the renderer or the judge."""
    model = tmp_path / "model"
    model.mkdir()
    for part in MODEL.iterdir():
        if part.name != HEAD_DIR:
            (model / part.name).symlink_to(part.resolve())
    square = np.zeros((64, 64), bool)
    square[20:40, 20:44] = True
    images = _operator_folder(tmp_path / "images", {"mine": np.full((64, 64, 3), 200, np.uint8),
                                                     "plain": np.zeros((64, 64, 3), np.uint8)},
                              {("mine", "square"): square})
    script = textwrap.dedent(f"""
        import sys
        from irece_cli.main import main
        assert main(["head", "train", "--model", {str(model)!r}, "--concepts", "circle", "square", "star",
                     "--n", "8", "--epochs", "2", "--cache", {str(tmp_path / "cache")!r},
                     "--images", {str(images)!r}]) == 0
        assert main(["calibrate", "--model", {str(model)!r}, "--n", "4", "--n-held-out", "4"]) == 0
        leaked = sorted(m for m in sys.modules if m in ("miniworld.shapes", "miniworld.judge", "miniworld.head"))
        assert not leaked, leaked
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((model / HEAD_DIR / HEAD_CONFIG).read_text())
    assert cfg["concepts"] == list(CONCEPTS) and cfg["items"] == 8 and 0 < cfg["kept"] <= 8
    assert cfg["images"] == {"folder": str(images), "pictures": 2, "masks": 1}
    split = cfg["calibration"]["split"]
    assert "own generations" in cfg["source"] and split["calibration"]["prompts"] == 4
    assert split["check"] and split["calibration"]["kept"] <= 4


def test_the_renderer_free_path_runs_command_by_command_on_the_sd14_architecture():
    """`irece bench any-model --small`: on the SD v1.4 architecture at random weights (smaller widths), head train ->
    calibrate -> serve --concept -> a text, an embedding and an inverted request each exit 0."""
    from benchmarks import any_model

    res = any_model.run(small=True, n=4, steps=2)
    steps = [r["step"] for r in res["rows"]]
    assert steps == ["model", "head train", "calibrate", "serve", "client text", "client embedding",
                     "client inverted"], res
    assert res["ok"] and all(r.get("rc", 0) == 0 for r in res["rows"]), res
