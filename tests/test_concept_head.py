"""The concept head and its gate (gate "head"): the pure functions, the hooked UNet, the head's file, the gate in
the pipeline, its training, and (mini world) its quality on seeds neither its training nor the benchmarks use."""
import json

import numpy as np
import pytest
import torch

from benchmarks import localization, presence
from irece_runtime import irece
from irece_runtime.concept_head import (FEATURE_BLOCKS, ConceptHead, HeadedUNet, UNetFeatures, head_config,
                                        load_head, save_head)
from irece_runtime.irece import IreceConfig
from irece_runtime.pipeline import Request

from .conftest import MODEL, model_image

TEST_SEED = 7_700_000  # the head trains on 6_000_000.., the benchmarks' splits are 7_100_000 and 7_200_000
T_STAR = 0.5
HAS_HEAD = (MODEL / "concept_head").is_dir()
needs_head = pytest.mark.skipif(not HAS_HEAD, reason=f"{MODEL} has no concept_head/ (`irece world head`)")
# measured on world v4's committed head v3 (git history of BENCHMARKS.md: held out AUC inverted 0.991, text
# 0.972, IoU 0.591 on 100 renders; on these tests' seeds 0.991 / 0.955 and IoU 0.578); the floors sit below, for
# 30-40 scenes. Head v4 on these seeds: inverted 0.996, text 0.946, perturbed references 0.959
FLOORS = {"auc_inverted": 0.95, "auc_text": 0.90, "auc_perturbed": 0.90, "iou": 0.54}


def test_head_scores_are_each_concepts_most_confident_cell():
    probs = torch.zeros(2, 3, 4, 4)
    probs[0, 0, 1, 2], probs[0, 1] = 0.9, 0.2
    probs[1, 2, 3, 3] = 0.6
    assert torch.equal(irece.head_scores(probs), torch.tensor([[0.9, 0.2, 0.0], [0.0, 0.0, 0.6]]))


def test_head_masks_keep_cells_over_tau_only_in_images_the_gate_passed():
    probs = torch.zeros(2, 2, 4, 4)
    probs[:, 0, :2, :2] = 0.8  # concept 0: a 2x2 region in both images
    probs[:, 1, 3, 3] = 0.3  # concept 1: one weak cell
    present = torch.tensor([[True, True], [False, True]])
    m = irece.head_masks(probs, torch.tensor([0.5, 0.4]), present)
    assert m[0, 0].sum() == 4 and m[0, 0, :2, :2].all()  # passed: exactly its cells >= tau
    assert m[1, 0].sum() == 0  # its gate closed in image 1
    assert m[:, 1].sum() == 0  # absolute probabilities: an open gate on a weak map gives no cell (no min-max)
    assert irece.head_masks(probs, 0.25, present)[:, 1].sum() == 2


@pytest.fixture(scope="module")
def unet(pipe):
    return pipe.backend.unets["standard"]


def test_hooked_unet_predicts_noise_bit_for_bit_and_records_only_in_its_own_pass(pipe, unet):
    feats = UNetFeatures(unet, FEATURE_BLOCKS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, pipe.backend.latent_channels, pipe.sample_size, pipe.sample_size, generator=g)
    h = pipe.null_hidden.expand(2, -1, -1)
    with torch.no_grad():
        plain = unet(x, torch.tensor(400), h).sample
        eps, f = feats(x, torch.tensor(400), h)
        again = unet(x, torch.tensor(400), h).sample
    assert torch.equal(plain, eps) and torch.equal(plain, again)
    assert feats.store.features is None  # not capturing outside its pass (the shared UNet serves other calls)
    blocks = dict(unet.named_modules())
    width = sum(blocks[b].resnets[-1].out_channels for b in FEATURE_BLOCKS)
    assert f.shape == (2, width, pipe.sample_size, pipe.sample_size)
    with pytest.raises(ValueError, match="no block named"):
        UNetFeatures(unet, ("up_blocks.99",))


@pytest.mark.parametrize("context", [0, 1])
def test_head_file_round_trips_exactly(pipe, unet, tmp_path, context):
    torch.manual_seed(0)
    feats = UNetFeatures(unet, FEATURE_BLOCKS)
    x = torch.randn(1, pipe.backend.latent_channels, pipe.sample_size, pipe.sample_size)
    with torch.no_grad():
        width = feats(x, torch.tensor(300), pipe.null_hidden)[1].shape[1]
    head = ConceptHead(width, ("star", "moon"), hidden=8, context=context).eval()
    head.mean.normal_()
    save_head(tmp_path, head, head_config(head, FEATURE_BLOCKS, [0.5]))
    loaded, cfg = load_head(tmp_path)
    assert cfg["concepts"] == ["star", "moon"] and cfg["blocks"] == list(FEATURE_BLOCKS)
    assert cfg["context"] == context == loaded.context
    model = HeadedUNet(unet, head, FEATURE_BLOCKS)
    with torch.no_grad():
        a = model(x, torch.tensor(300), pipe.null_hidden)
        model.head = loaded
        b = model(x, torch.tensor(300), pipe.null_hidden)
    assert torch.equal(a, b) and a.shape == (1, 2, pipe.sample_size, pipe.sample_size)
    assert load_head(tmp_path / "elsewhere") is None


@needs_head
def test_head_gate_above_any_score_leaves_the_image_bit_identical(pipe):
    req = Request(init_image=model_image(pipe, "star", seed=3), steps=10, seed=1)
    off = pipe.generate(req, None)
    closed = pipe.generate(req, IreceConfig(concepts=("star",), gate="head", threshold=1.01, t_star=T_STAR))
    assert np.array_equal(off.images, closed.images)
    (c,) = closed.irece.concepts
    assert not c.intervened and c.mask_area == 0 and 0.0 <= c.score <= 1.0 and c.threshold == 1.01


@needs_head
@pytest.mark.parametrize("grow", [0, 1])
def test_head_gate_masks_exactly_the_heads_cells_over_tau(pipe, monkeypatch, grow):
    """At threshold 0 the mask is the head's own map >= tau (grown by `grow` cells, but not into cells where the
    head sees another concept), from one standard-UNet row per image."""
    seen = []
    orig = pipe.backend.concept_head
    monkeypatch.setattr(pipe.backend, "concept_head",
                        lambda x, t, h: seen.append(orig(x, t, h)) or seen[-1])
    req = Request(init_image=model_image(pipe, "star", seed=3), steps=10, seed=1)
    cfg = IreceConfig(concepts=("star",), gate="head", threshold=0.0, t_star=T_STAR, grow=grow)
    res = pipe.generate(req, cfg)
    (probs,) = seen
    star = pipe.head_concepts.index("star")
    others = (probs[:, [k for k in range(probs.shape[1]) if k != star]] >= cfg.tau).any(1)
    expect = irece.grow_mask((probs[:, star] >= cfg.tau).float(), grow, others).bool()
    if grow:
        assert expect.sum() > (probs[:, star] >= cfg.tau).sum()
    assert torch.equal(res.irece.mask.bool(), expect)
    assert res.irece.concepts[0].intervened == bool(expect.any())


@needs_head
def test_head_gate_refuses_a_concept_the_head_was_not_trained_on(pipe):
    with pytest.raises(ValueError, match="no output for 'unicorn'"):
        pipe.generate(Request(prompt="a unicorn", steps=2), IreceConfig(concepts=("unicorn",), gate="head"))


def test_head_training_writes_a_head_the_pipeline_gates_with(tmp_path, pipe):
    """`irece world head` on a few scenes (a smoke run): the head lands in the model folder, which then loads with
    the head's concepts and gates through it."""
    import shutil

    from irece_runtime.loading import load_pipeline
    from miniworld.head import train_head
    model = tmp_path / "model"
    shutil.copytree(MODEL, model, ignore=shutil.ignore_patterns("concept_head"))
    res = train_head(model, n=6, epochs=1, cache=tmp_path / "cache")
    assert res["examples"] == 6 * 2  # each scene inverted and generated, fitted at t* = 0.5 alone
    assert json.loads((model / "concept_head" / "config.json").read_text())["trained_at"] == [0.5]
    (chunk,) = (tmp_path / "cache").glob("*/chunk_*.safetensors")  # collected at all 3 points, cached
    written = chunk.stat().st_mtime_ns
    again = train_head(model, n=6, epochs=1, cache=tmp_path / "cache", fit_at=(0.3, 0.5, 0.7))
    assert again["examples"] == 6 * 2 * 3 and again["trained_at"] == [0.3, 0.5, 0.7]
    assert chunk.stat().st_mtime_ns == written  # read back, not collected again
    # the fit flushes denormals; the flag is process state and must not outlive it (hypothesis refuses to run then)
    assert torch.tensor([1e-310], dtype=torch.float64).mul(1.0).item() != 0.0
    p = load_pipeline(model)
    assert p.head_concepts == tuple(res["concepts"])
    out = p.generate(Request(prompt="a star", steps=4, seed=0),
                     IreceConfig(concepts=(p.head_concepts[0],), gate="head", threshold=0.0, t_star=0.5))
    assert out.irece.concepts[0].score >= 0.0


@pytest.mark.shapes10_only
@needs_head
def test_head_tells_present_from_absent_concepts_on_unseen_scenes(pipe):
    cfg = IreceConfig(gate="head", t_star=T_STAR)
    rows = presence.score_splits(pipe, 30, 25, 5.0, cfg, splits=(("test", TEST_SEED),))["test"]
    inv = presence.summarize([r for r in rows if r["source"] == "inverted"])
    txt = presence.summarize([r for r in rows if r["source"] == "text"])
    # the same renders noised, blurred or JPEG'd before inversion (the CRR bench's black-box references)
    per = presence.summarize(presence.score_scenes(pipe, presence.scenes(30, TEST_SEED), "perturbed", cfg, 25, 5.0,
                                                   TEST_SEED))
    print(f"\nhead presence on unseen scenes: inverted {inv['auc']:.3f}, text {txt['auc']:.3f}, "
          f"perturbed {per['auc']:.3f}")
    assert inv["auc"] >= FLOORS["auc_inverted"] and txt["auc"] >= FLOORS["auc_text"], (inv, txt)
    assert per["auc"] >= FLOORS["auc_perturbed"], per


@pytest.mark.shapes10_only
@needs_head
def test_head_masks_match_the_renderers_shapes(pipe):
    """Localization IoU against the renderer's masks (inverted single-shape renders, gate open): the head's map
    is concept-specific and absolute, the paper's min-max attention mask is neither (IoU 0.37 on world v4; 0.40 on
    these 40 renders against the head's 0.58)."""
    from miniworld import shapes
    rng = np.random.default_rng(TEST_SEED)
    scenes = [shapes.render(shapes.CONCEPTS[i % 10], rng=rng) for i in range(40)]
    masks = localization.masks_for(pipe, np.stack([s.image for s in scenes]), [s.label for s in scenes], 0.4,
                                   T_STAR, 25, gate="head", threshold=0.0)
    ious = [localization.iou(localization.pixel_mask(m), s.mask) for m, s in zip(masks, scenes)]
    paper = localization.masks_for(pipe, np.stack([s.image for s in scenes]), [s.label for s in scenes], 0.4,
                                   T_STAR, 25)
    paper_ious = [localization.iou(localization.pixel_mask(m), s.mask) for m, s in zip(paper, scenes)]
    print(f"\nIoU on unseen renders: head {np.mean(ious):.3f}, paper {np.mean(paper_ious):.3f}")
    assert np.mean(ious) >= FLOORS["iou"] and np.mean(ious) > np.mean(paper_ious) + 0.05, (np.mean(ious),
                                                                                           np.mean(paper_ious))


@needs_head
def test_server_with_the_head_gate_serves_gated_requests_and_refuses_concepts_the_head_does_not_know(pipe):
    import grpc

    from protos.irece.v1 import generation_pb2 as pb
    from server.config import ServerConfig
    from server.metrics import Metrics
    from server.service import GenerationService

    from .test_server import running
    with running(pipe, gate="head", threshold=1.01, t_star=T_STAR, allowed_concepts=["unicorn"]) as s:
        resp = s.stub.Generate(pb.GenerateRequest(text=pb.TextPrompt(prompt="a red star on a white background")))
        (c,) = resp.irece.concepts
        assert c.concept == "star" and not c.intervened and 0.0 <= c.score <= 1.0
        with pytest.raises(grpc.RpcError) as err:  # in the catalogue, but the head cannot gate it
            s.stub.Generate(pb.GenerateRequest(text=pb.TextPrompt(prompt="x"), suppress_concepts=["unicorn"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "suppress_concepts[0]" in err.value.details()
    cfg = ServerConfig(model=str(MODEL), concepts=["unicorn"], gate="head", port=0, metrics_port=0)
    with pytest.raises(ValueError, match="no output for 'unicorn'"):  # the operator's own concept: no start
        GenerationService(cfg, Metrics(), pipe)


@needs_head
def test_server_warns_when_the_head_gate_looks_far_from_where_the_head_trained(pipe, caplog):
    from server.config import ServerConfig
    from server.metrics import Metrics
    from server.service import GenerationService

    trained = load_head(MODEL)[1]["trained_at"]
    assert pipe.head_trained_at == tuple(trained)
    for t_star, warned in ((float(trained[0]), False), (round(float(trained[0]) - 0.2, 2), True)):
        caplog.clear()
        cfg = ServerConfig(model=str(MODEL), concepts=["star"], gate="head", t_star=t_star, port=0, metrics_port=0)
        with caplog.at_level("WARNING", logger="irece.server"):
            GenerationService(cfg, Metrics(), pipe)
        assert ("the concept head was trained at" in caplog.text) == warned, (t_star, caplog.text)
