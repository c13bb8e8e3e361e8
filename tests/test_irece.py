"""IRECE's pure functions against the paper's formulas."""
import pytest
import torch

from irece_runtime import irece


def test_perturb_replace_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    x, xi = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    m = (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    expected = (1 - m[:, None]) * x + m[:, None] * xi
    assert torch.equal(irece.perturb(x, m, xi, "replace"), expected)
    assert torch.equal(irece.perturb(x, m, xi, "add"), x + m[:, None] * xi)


def test_empty_mask_leaves_latent_bit_identical():
    x = torch.randn(1, 4, 8, 8)
    xi = torch.randn(1, 4, 8, 8)
    for mode in irece.PERTURB_MODES:
        assert torch.equal(irece.perturb(x, torch.zeros(1, 8, 8), xi, mode), x)


def test_minmax_and_threshold():
    cm = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    assert torch.allclose(irece.minmax(cm), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    assert torch.equal(irece.concept_mask(cm, 0.4), torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))
    assert torch.equal(irece.concept_mask(cm, 0.2), torch.tensor([[[0.0, 1.0], [1.0, 1.0]]]))
    # the presence gate: a weak peak means the concept is absent, no intervention
    assert irece.concept_mask(cm, 0.4, min_peak=5.0).sum() == 0
    # min-max is scale-free: the mask depends only on the map's shape
    assert torch.equal(irece.concept_mask(cm * 7 + 3, 0.4), irece.concept_mask(cm, 0.4))


def test_aggregate_upsamples_and_averages_layers():
    a = torch.zeros(1, 16)  # a 4x4 layer with its mass top-left
    a[0, 0] = 1.0
    b = torch.zeros(1, 64)  # an 8x8 layer with its mass bottom-right
    b[0, 63] = 1.0
    out = irece.aggregate_maps([a, b], (8, 8))
    assert out.shape == (1, 8, 8)
    assert out[0, :2, :2].mean() > out[0, 2:6, 2:6].mean()  # top-left survives upsampling
    assert out[0, 7, 7] == pytest.approx(0.5)  # the 8x8 layer's peak, halved by the average of 2 layers
    single = irece.aggregate_maps([b], (8, 8))
    assert torch.equal(single[0].flatten(), b[0])  # same-resolution layer: identity


def test_aggregate_non_square_latent():
    m = torch.arange(8.0)[None]  # a 2x4 map in a 4x8 latent
    assert irece.aggregate_maps([m], (4, 8)).shape == (1, 4, 8)


def test_token_weights_cover_every_occurrence():
    w = irece.token_weights([49406, 320, 1125, 539, 320, 2368, 49407], [2368])
    assert w[5] == 1.0 and w.sum() == 1.0
    w = irece.token_weights([49406, 10, 11, 5, 10, 11], [10, 11])
    assert torch.allclose(w[[1, 2, 4, 5]], torch.full((4,), 0.25))
    with pytest.raises(ValueError):
        irece.token_weights([49406, 1, 2], [3])


def test_config_validation_and_t_star():
    assert irece.IreceConfig(t_star=0.3).step_index(25) == 8  # round(7.5) = 8
    assert irece.IreceConfig(t_star=5).step_index(25) == 5
    assert irece.IreceConfig(t_star=0.0).step_index(10) == 0
    with pytest.raises(ValueError):
        irece.IreceConfig(t_star=30).step_index(25)
    with pytest.raises(ValueError):
        irece.IreceConfig(tau=1.5)
    with pytest.raises(ValueError):
        irece.IreceConfig(mode="zero")


def test_plan_groups_concepts_by_their_tuned_step():
    cfg = irece.IreceConfig(concepts=("star", "moon", "ring"), tau=0.4, t_star=0.2,
                            per_concept={"moon": {"tau": 0.3, "t_star": 10}, "ring": {"tau": 0.5}})
    assert cfg.plan(25) == {5: [("star", 0.4), ("ring", 0.5)], 10: [("moon", 0.3)]}
