"""IRECE's pure functions against the paper's formulas."""
import pytest
import torch
import torch.nn.functional as F

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


def test_perturb_keeps_the_latents_memory_layout():
    """The denoising loop's latent is channels_last (it comes out of the UNet); a perturbed latent laid out otherwise
    denoises a pixel level apart, so images IRECE left alone in a batch would no longer be bit-identical."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    xi = torch.randn(3, 4, 8, 8, generator=g)
    m = torch.zeros(3, 8, 8)
    m[1, 2:5, 2:5] = 1
    for mode in irece.PERTURB_MODES:
        out = irece.perturb(x, m, xi, mode)
        assert out.stride() == x.stride(), mode
        assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2]) and not torch.equal(out[1], x[1])


def test_minmax_and_threshold():
    cm = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    assert torch.allclose(irece.minmax(cm), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    assert torch.equal(irece.concept_mask(cm, 0.4), torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))
    assert torch.equal(irece.concept_mask(cm, 0.2), torch.tensor([[[0.0, 1.0], [1.0, 1.0]]]))
    # min-max is scale-free: the mask depends only on the map's shape
    assert torch.equal(irece.concept_mask(cm * 7 + 3, 0.4), irece.concept_mask(cm, 0.4))


def test_aggregate_upsamples_and_averages_layers():
    a = torch.zeros(1, 16, 1)  # a 4x4 layer with its mass top-left
    a[0, 0] = 1.0
    b = torch.zeros(1, 64, 1)  # an 8x8 layer with its mass bottom-right
    b[0, 63] = 1.0
    out = irece.aggregate_maps([a, b], (8, 8))[:, 0]
    assert out.shape == (1, 8, 8)
    assert out[0, :2, :2].mean() > out[0, 2:6, 2:6].mean()  # top-left survives upsampling
    assert out[0, 7, 7] == pytest.approx(0.5)  # the 8x8 layer's peak, halved by the average of 2 layers
    single = irece.aggregate_maps([b], (8, 8))
    assert torch.equal(single[0, 0].flatten(), b[0, :, 0])  # same-resolution layer: identity


def test_aggregate_keeps_each_token_set_apart():
    m = torch.zeros(2, 16, 3)  # batch 2, three token sets, each with its mass in another cell
    for k in range(3):
        m[:, 5 * k, k] = 1.0
    out = irece.aggregate_maps([m], (4, 4))
    assert out.shape == (2, 3, 4, 4)
    for k in range(3):
        assert out[:, k].flatten(1).argmax(1).tolist() == [5 * k, 5 * k]


def test_aggregate_non_square_latent():
    m = torch.arange(8.0)[None, :, None]  # a 2x4 map in a 4x8 latent
    assert irece.aggregate_maps([m], (4, 8)).shape == (1, 1, 4, 8)


def test_token_weights_cover_every_occurrence():
    w = irece.token_weights([49406, 320, 1125, 539, 320, 2368, 49407], [2368])
    assert w[5] == 1.0 and w.sum() == 1.0
    w = irece.token_weights([49406, 10, 11, 5, 10, 11], [10, 11])
    assert torch.allclose(w[[1, 2, 4, 5]], torch.full((4,), 0.25))
    with pytest.raises(ValueError, match=r"concept tokens \[3\] not found"):
        irece.token_weights([49406, 1, 2], [3])


def test_config_validation_and_t_star():
    assert irece.IreceConfig(t_star=0.3).step_index(25) == 8  # round(7.5) = 8
    assert irece.IreceConfig(t_star=5).step_index(25) == 5
    assert irece.IreceConfig(t_star=0.0).step_index(10) == 0
    with pytest.raises(ValueError, match="t_star index 30 outside 0..24"):
        irece.IreceConfig(t_star=30).step_index(25)
    with pytest.raises(ValueError, match="tau must be in"):
        irece.IreceConfig(tau=1.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        irece.IreceConfig(mode="zero")
    with pytest.raises(ValueError, match="t_star as a fraction"):
        irece.IreceConfig(t_star=1.0)


def test_plan_groups_concepts_by_their_tuned_step():
    cfg = irece.IreceConfig(concepts=("star", "moon", "ring"), tau=0.4, t_star=0.2,
                            per_concept={"moon": {"tau": 0.3, "t_star": 10}, "ring": {"tau": 0.5}})
    assert cfg.plan(25) == {5: [("star", 0.4, 0.5), ("ring", 0.5, 0.5)], 10: [("moon", 0.3, 0.5)]}


def test_gate_is_validated_and_per_concept_thresholds_enter_the_plan():
    for gone in ("sometimes", "contrastive"):  # the contrastive gate left the product
        with pytest.raises(ValueError, match="gate must be one of"):
            irece.IreceConfig(gate=gone)
    plan = irece.IreceConfig(concepts=("star", "moon"), threshold=0.6,
                             per_concept={"moon": {"threshold": 0.8, "t_star": 2}}).plan(10)
    assert plan == {3: [("star", 0.4, 0.6)], 2: [("moon", 0.4, 0.8)]}


def test_parse_t_star():
    assert irece.parse_t_star("0.3") == 0.3 and isinstance(irece.parse_t_star("7"), int)
    assert irece.parse_t_star(5) == 5
    with pytest.raises(ValueError, match="t_star must be"):
        irece.parse_t_star("soon")


def test_predicted_x0_inverts_the_forward_process():
    g = torch.Generator().manual_seed(0)
    x0, xi = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for a in (0.9, 0.3, 0.02):
        x_t = irece.renoise(x0, xi, a)
        assert torch.allclose(x_t, a ** 0.5 * x0 + (1 - a) ** 0.5 * xi, atol=1e-6)  # DDPM's q(x_t | x0)
        assert torch.allclose(irece.predicted_x0(x_t, xi, a), x0, atol=1e-4)  # the true noise gives x0 back


def test_classifier_scores_favour_the_concept_that_denoises_best():
    # (B=2, T'=2, K=3 + null): image 0 is explained by concept 1, image 1 by concepts 0 and 2 alike
    err = torch.tensor([[[1.0, 0.8, 1.0, 1.0], [0.5, 0.4, 0.5, 0.5]],
                        [[0.9, 1.0, 0.9, 1.0], [0.9, 1.0, 0.9, 1.0]]])
    s = irece.classifier_scores(err, temperature=50.0)
    assert s.shape == (2, 3) and torch.allclose(s.sum(1), torch.ones(2))
    assert s[0].argmax() == 1 and s[0, 1] > 0.99  # relative error 0.8 against 1.0: e^-10 for the others
    assert torch.allclose(s[1, 0], s[1, 2]) and s[1, 1] < 0.01  # two shown concepts share the mass
    # errors are read relative to the null prompt's: scaling an image's (or a timestep's) errors changes nothing
    assert torch.allclose(irece.classifier_scores(err * torch.tensor([[[3.0]], [[0.1]]])), s)
    # nothing explains the image better than anything else: every concept 1/K
    assert torch.allclose(irece.classifier_scores(torch.ones(1, 3, 5)), torch.full((1, 4), 0.25))


def test_classifier_gate_is_a_gate():
    assert "classifier" in irece.GATES and irece.PRESENCE_GATE in irece.GATES
    assert irece.IreceConfig(gate="classifier").gate == "classifier"


@pytest.mark.parametrize("bad", [(), (1000,), (-1,), (300.0,), (True,)])
def test_classifier_timesteps_are_validated(bad):
    with pytest.raises(ValueError, match="classifier_timesteps"):
        irece.IreceConfig(gate="classifier", classifier_timesteps=bad)


def test_recheck_adds_later_intervention_steps_for_every_concept():
    cfg = irece.IreceConfig(concepts=("cat", "dog"), t_star=0.5, recheck=(0.7, 20),
                            per_concept={"dog": {"t_star": 0.3, "tau": 0.6}})
    plan = cfg.plan(25)
    assert list(plan) == [8, 12, 18, 20]  # in schedule order
    assert plan[12] == [("cat", 0.4, 0.5)] and plan[8] == [("dog", 0.6, 0.5)]
    assert plan[18] == plan[20] == [("cat", 0.4, 0.5), ("dog", 0.6, 0.5)]
    assert irece.IreceConfig(concepts=("cat",), t_star=0.5, recheck=(0.5,)).plan(25) == {12: [("cat", 0.4, 0.5)]}


def test_each_recheck_look_can_have_its_own_threshold():
    cfg = irece.IreceConfig(concepts=("cat",), t_star=0.5, threshold=0.2, recheck=(0.7, 0.9),
                            recheck_threshold=(0.4, 0.6))
    assert cfg.plan(25) == {12: [("cat", 0.4, 0.2)], 18: [("cat", 0.4, 0.4)], 22: [("cat", 0.4, 0.6)]}
    # without them every look takes t*'s threshold; two points on one step: the earlier one's settings
    assert irece.IreceConfig(concepts=("cat",), t_star=0.5, threshold=0.2, recheck=(0.7,)).plan(25)[18] == \
        [("cat", 0.4, 0.2)]
    assert irece.IreceConfig(concepts=("cat",), t_star=0.5, threshold=0.2, recheck=(0.5,),
                             recheck_threshold=(0.9,)).plan(25) == {12: [("cat", 0.4, 0.2)]}
    for bad in ((0.4,), (0.4, float("nan")), (0.4, True)):
        with pytest.raises(ValueError, match="recheck_threshold"):
            irece.IreceConfig(recheck=(0.7, 0.9), recheck_threshold=bad)


@pytest.mark.parametrize("kw", [dict(conditioning="drop"), dict(conditioning="null"), dict(recheck=(1.5,)),
                                dict(recheck=(-1,)), dict(recheck=("0.7",)), dict(recheck=(True,)),
                                dict(gate="classifier", conditioning="null", conditioning_threshold=1.5)])
def test_conditioning_and_recheck_are_validated(kw):
    with pytest.raises(ValueError, match=list(kw)[-1]):
        irece.IreceConfig(**kw)


def test_reports_merge_the_conditioning_flag():
    a = irece.IreceReport(3, 500, [irece.ConceptReport("cat", 0.0, 0.1, False)], torch.zeros(1, 2, 2))
    b = irece.IreceReport(5, 300, [irece.ConceptReport("cat", 0.5, 0.3, True)], torch.ones(1, 2, 2),
                          unconditioned=True)
    d = a.merge(b).to_dict()
    assert d["unconditioned"] and d["step_index"] == 3 and [c["intervened"] for c in d["concepts"]] == [False, True]


def test_conditioning_scores_name_the_reference_a_conditioning_reproduces():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 3, 4, 4, 8, 8, generator=g)  # B=2, T'=3, K=3 concepts + null
    cond = torch.stack([ref[0, :, 1], ref[1, :, 3]]) + 0.01 * torch.randn(2, 3, 4, 8, 8, generator=g)
    s = irece.conditioning_scores(cond, ref)
    assert s.shape == (2, 3)
    assert s[0].argmax() == 1 and s[0, 1] > 0.9  # reproduces concept 1's prediction
    assert s[1].max() < 0.05  # reproduces the null prompt's: carries no concept


def test_score_bounds_settle_a_decision_only_where_the_remaining_t_prime_cannot_change_it():
    """The final score is the mean of one share in [0, 1] per t': after 1 of 3, 0.95 is past a 0.305 bar whatever
    follows (0.95 / 3 >= 0.305), 0.9 is not; after 2 of 3, a mean of 0.1 stays under 0.5 ((0.2 + 1) / 3)."""
    b = irece.ScoreBounds(torch.zeros(1, 1), None, 1, 3)
    assert b.settled(torch.tensor([0.95]), 0.305).item() and not b.settled(torch.tensor([0.9]), 0.305).item()
    assert irece.ScoreBounds(torch.zeros(1, 1), None, 2, 3).settled(torch.tensor([0.1]), 0.5).item()
    assert irece.ScoreBounds(torch.zeros(1, 1), None, 3, 3).settled(torch.rand(5), 0.5).all()
    # against brute force: wherever a prefix settles, the prefix mean falls on the final mean's side of the bar
    g = torch.Generator().manual_seed(0)
    shares = torch.rand(4000, 3, generator=g).pow(torch.rand(4000, 1, generator=g) * 6)  # skewed both ways
    final = shares.mean(1)
    settled_any = 0
    for bar in (0.1, 0.305, 0.5, 0.8):
        for done in (1, 2):
            mean = shares[:, :done].mean(1)
            ok = irece.ScoreBounds(mean[:, None], None, done, 3).settled(mean, bar)
            assert torch.equal((mean[ok] >= bar), (final[ok] >= bar))
            settled_any += int(ok.sum())
    assert settled_any > 1000  # the bound does settle many, so the check above is not empty


def test_grow_mask_dilates_by_whole_cells_and_leaves_empty_masks_empty():
    m = torch.zeros(2, 6, 6)
    m[0, 2, 3] = 1
    grown = irece.grow_mask(m, 1)
    expect = torch.zeros(6, 6)
    expect[1:4, 2:5] = 1  # the cell and its 8 neighbours
    assert torch.equal(grown[0], expect)
    assert not grown[1].any()  # an image the gate left alone stays untouched
    assert torch.equal(irece.grow_mask(m, 0), m)
    corner = torch.zeros(1, 4, 4)
    corner[0, 0, 0] = 1
    assert irece.grow_mask(corner, 2)[0].sum() == 9  # clipped at the border: rows/cols 0..2
    with pytest.raises(ValueError, match="grow"):
        irece.IreceConfig(grow=-1)


def test_grow_mask_spares_cells_another_concept_holds_but_keeps_the_masks_own():
    m = torch.zeros(1, 6, 6)
    m[0, 2, 2:4] = 1  # the target's own cells
    spare = torch.zeros(1, 6, 6, dtype=torch.bool)
    spare[0, :, 4] = True  # a neighbouring shape's column
    spare[0, 2, 3] = True  # a cell both claim: the target's own, so it stays
    grown = irece.grow_mask(m, 1, spare)
    plain = irece.grow_mask(m, 1)
    assert torch.equal(grown, torch.maximum(plain * ~spare, m)) and grown[0, 2, 3] == 1
    assert not grown[0, :, 4].any() and plain[0, 1:4, 4].all()  # the growth stopped at the other shape
    assert grown[0, 1:4, 1:4].all()  # elsewhere it grew as before
    assert not irece.grow_mask(torch.zeros(1, 6, 6), 1, spare).any()


def test_off_schedule_names_each_t_star_far_from_where_the_head_trained():
    cfg = irece.IreceConfig(concepts=("star", "moon"), t_star=0.3, per_concept={"moon": {"t_star": 0.5}},
                            recheck=(0.9,))
    assert irece.off_schedule(cfg, (0.5,), 20) == [0.3]  # star's t* only: moon's is where it trained, rechecks free
    assert irece.off_schedule(cfg, (0.3, 0.5), 20) == []
    assert irece.off_schedule(cfg, (), 20) == []  # a head that does not say where it trained: nothing to compare
    assert irece.off_schedule(irece.IreceConfig(concepts=("star",), t_star=10), (0.5,), 20) == []  # a step index
    assert irece.off_schedule(irece.IreceConfig(concepts=("star",), t_star=4), (0.5,), 20) == [0.2]


def test_keep_pixels_outside_takes_the_reference_outside_each_masked_images_cells_only():
    g = torch.Generator().manual_seed(2)
    images, reference = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mask = torch.zeros(2, 4, 4)
    mask[0, 1, 2] = 1  # one latent cell: pixels rows 2-3, columns 4-5 of the image
    out = irece.keep_pixels_outside(images, reference, mask)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:4, 4:6] = True
    assert torch.equal(out[0][:, inside], images[0][:, inside])  # the redrawn cell: the denoised image's
    assert torch.equal(out[0][:, ~inside], reference[0][:, ~inside])  # elsewhere: the input's
    assert torch.equal(out[1], images[1])  # no mask: IRECE left it alone, so nothing is taken from the input


def test_head_contest_holds_the_target_then_each_shown_other_and_never_an_unshown_one():
    target = torch.tensor([[[0.9, 0.2], [0.1, 0.0]]])  # (1, 2, 2)
    others = torch.stack([torch.tensor([[0.1, 0.6], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.8, 0.0]])])[None]
    contest = irece.head_contest(target, others, torch.tensor([[True, False]]))
    assert contest.shape == (1, 3, 2, 2)
    assert torch.equal(contest[0, 0], target[0]) and torch.equal(contest[0, 1], others[0, 0])
    assert torch.equal(contest[0, 2], torch.full((2, 2), -1.0))  # not shown: its 0.8 over the target's 0.1 counts not


def test_keep_others_keeps_the_pixels_where_another_concepts_upsampled_probability_beats_the_targets():
    """Anchor: upsample the target's and the other's probabilities separately and compare them pixel by pixel."""
    g = torch.Generator().manual_seed(5)
    images, reference = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    target, other = torch.rand(2, 4, 4, generator=g), torch.rand(2, 1, 4, 4, generator=g)
    mask = torch.zeros(2, 4, 4)
    mask[0, :, :3] = 1  # image 1: no mask, IRECE left it alone
    contest = irece.head_contest(target, other, torch.tensor([[True], [True]]))
    up = lambda m: F.interpolate(m[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]  # noqa: E731
    outside = F.interpolate(mask[:, None], size=(16, 16), mode="nearest")[:, 0] == 0
    inside_kept = {}
    for floor in (0.0, 0.5):
        out = irece.keep_pixels_outside(images, reference, mask, contest, floor)
        o, t = up(other[:, 0])[0], up(target)[0]
        clear = ((o - t).abs() > 1e-6) & ((o - floor).abs() > 1e-6)  # a near-tie may round either way
        beats = (o > t) & (o >= floor)
        kept, redrawn = (outside[0] | beats) & clear, ~outside[0] & ~beats & clear
        assert int((~outside[0] & kept).sum()) > 0 and int(redrawn.sum()) > 0  # some masked pixels kept, not all
        assert torch.equal(out[0][:, kept], reference[0][:, kept])
        assert torch.equal(out[0][:, redrawn], images[0][:, redrawn])
        assert torch.equal(out[1], images[1])
        inside_kept[floor] = int((~outside[0] & kept).sum())
    assert inside_kept[0.5] < inside_kept[0.0]  # the floor spares the pixels where the other is faint
    plain = irece.keep_pixels_outside(images, reference, mask)  # without a contest: every masked pixel redrawn
    assert torch.equal(plain[0][:, ~outside[0]], images[0][:, ~outside[0]])
    assert torch.equal(plain[0][:, outside[0]], reference[0][:, outside[0]])


def test_keep_others_needs_keep_outside_and_the_head_gate():
    irece.IreceConfig(gate="head", keep_outside=True, keep_others=True)
    for bad in ({"gate": "head"}, {"gate": "classifier", "keep_outside": True}):
        with pytest.raises(ValueError, match="keep_others"):
            irece.IreceConfig(keep_others=True, **bad)
