"""The adaptive attacks of `irece bench adaptive` really optimise: on a smoke run their objective (the presence
gate's score of the concept at the defence's checks) falls. Model-agnostic in code; the renders are the mini
world's."""
import numpy as np
import pytest
import torch

from benchmarks import adaptive
from benchmarks import batch as gen
from benchmarks.crr import references
from irece_runtime.irece import IreceConfig
from irece_runtime.pipeline import IreceStep

pytestmark = pytest.mark.shapes10_only
S = adaptive.AdaptiveSettings(n=2, steps=10, t_star=0.5)
# a threshold under every score: the hinge is the score itself, so it can only fall by lowering the score
CFG = IreceConfig(concepts=("star",), gate="classifier", t_star=0.5, threshold=adaptive.MARGIN, conditioning="null",
                  recheck=(0.7,))


def mean_score(pipe, vec: torch.Tensor, seeds: list[int]) -> float:
    """The gate's mean score of star at both checks, generating with the embedding on seeds the attack never saw."""
    with torch.no_grad():
        cond = torch.cat([pipe.encode_prompt("a <c>", {"<c>": vec})] * len(seeds))
        seen = adaptive.checks(pipe, pipe.backend, gen.noise(pipe, seeds), cond, pipe.encode_prompt(""), S.guidance,
                               S.steps, CFG)
        return float(adaptive.gate_scores(pipe, pipe.backend, seen, CFG, "star").mean())


def test_checks_see_the_latents_the_defence_sees(pipe, monkeypatch):
    """The attack's view of x_t at t* and at the recheck is the pipeline's own (same loop, same steps)."""
    x_T = gen.noise(pipe, [5])
    cond, null = pipe.encode_prompt("a star"), pipe.encode_prompt("")
    seen = adaptive.checks(pipe, pipe.backend, x_T, cond, null, S.guidance, S.steps, CFG)
    assert [i for i, _, _ in seen] == sorted(CFG.plan(S.steps)) == [5, 7]
    recorded = {}
    real = IreceStep._intervene

    def spy(self, i, t, x):
        recorded[i] = x.clone()
        return (yield from real(self, i, t, x))
    monkeypatch.setattr(IreceStep, "_intervene", spy)
    # a gate that never fires: the defended loop follows the undefended trajectory the attack optimises on
    pipe.denoise(x_T, cond, null, S.guidance, S.steps, IreceConfig(concepts=("star",), gate="classifier",
                                                                    t_star=0.5, threshold=1.01, recheck=(0.7,)))
    for i, _, x in seen:
        assert torch.allclose(x, recorded[i], atol=1e-5)


def test_pgd_on_the_reference_lowers_the_gate_score_within_its_budget(pipe):
    refs = references("star", 2, False, 11)
    made = adaptive.pgd_references(pipe, refs, "star", CFG, [0, 3], S)
    assert made["losses"][-1] < 0.9 * made["losses"][0]
    assert np.abs(made[3].astype(int) - refs.astype(int)).max() <= round(255 * S.epsilon) + 1


def test_adaptive_textual_inversion_lowers_the_gate_score_on_unseen_seeds(pipe):
    ids = pipe.tokenizer("star", add_special_tokens=False).input_ids
    vec0 = pipe.backend.embed_tokens(torch.tensor([ids]))[0, :1].clone()
    made = adaptive.adaptive_ti(pipe, vec0, "star", CFG, [0, 6], S, lr=0.02)
    seeds = [adaptive.EVAL_SEED + k for k in range(4)]
    assert mean_score(pipe, made[6], seeds) < mean_score(pipe, made[0], seeds)
