"""The adaptive attacks of `irece bench adaptive` really optimise: on a smoke run their objective (the presence
gate's score of the concept at the defence's checks) falls. Model-agnostic in code; the renders are the mini
world's."""
import json

import numpy as np
import pytest
import torch

from benchmarks import adaptive
from benchmarks import batch as gen
from benchmarks.crr import references
from irece_runtime.irece import IreceConfig
from irece_runtime.stages import Look
from miniworld.assets import MODEL_DIR

pytestmark = pytest.mark.shapes10_only
S = adaptive.AdaptiveSettings(n=2, steps=10, t_star=0.5)
# a threshold under every score: the hinge is the score itself, so it can only fall by lowering the score
CFG = IreceConfig(concepts=("star",), gate="classifier", t_star=0.5, threshold=adaptive.MARGIN, conditioning="null",
                  recheck=(0.7,))


def objective(pipe, vec: torch.Tensor, seeds: list[int]) -> float:
    """The attacker's objective (gate and conditioning scores over their thresholds, at both checks), generating
    with the embedding on seeds the attack never saw."""
    with torch.no_grad():
        cond = torch.cat([pipe.encode_prompt("a <c>", {"<c>": vec})] * len(seeds))
        seen = adaptive.checks(pipe, pipe.backend, gen.noise(pipe, seeds), cond, pipe.encode_prompt(""), S.guidance,
                               S.steps, CFG)
        return float(adaptive.evasion(pipe, pipe.backend, seen, CFG, "star", cond, S.steps))


def test_checks_see_the_latents_the_defence_sees(pipe, monkeypatch):
    """The attack's view of x_t at t* and at the recheck is the pipeline's own (same loop, same steps)."""
    x_T = gen.noise(pipe, [5])
    cond, null = pipe.encode_prompt("a star"), pipe.encode_prompt("")
    seen = adaptive.checks(pipe, pipe.backend, x_T, cond, null, S.guidance, S.steps, CFG)
    assert [i for i, _, _ in seen] == sorted(CFG.plan(S.steps)) == [5, 7]
    recorded = {}
    real = Look._look

    def spy(self, state, i, t, x):
        recorded[i] = x.clone()
        return (yield from real(self, state, i, t, x))
    monkeypatch.setattr(Look, "_look", spy)
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
    assert objective(pipe, made[6], seeds) < objective(pipe, made[0], seeds)


def test_against_the_policy_the_objective_is_the_heads_own_score_at_each_check_with_its_threshold(pipe):
    """Attacking the recommended policy (the concept head): the attacker's scores at t* and at each recheck are the
    ones the defence reports for the same request (a blind threshold keeps the defended loop on the undefended
    trajectory), and each check's hinge uses that look's calibrated threshold."""
    from irece_runtime.pipeline import Request
    from irece_runtime.policy import resolve
    policy = resolve("gated", MODEL_DIR, ["star"])
    blind = resolve("gated", MODEL_DIR, ["star"], {"threshold": 2.0, "recheck_threshold": [2.0, 2.0]})
    res = pipe.generate(Request(prompt="a red star on a black background", seed=3, steps=S.steps), blind)
    x_T = gen.noise(pipe, [3])
    seen = adaptive.checks(pipe, pipe.backend, x_T, pipe.encode_prompt("a red star on a black background"),
                           pipe.encode_prompt(""), S.guidance, S.steps, policy)
    scores, read = adaptive.gate_scores(pipe, pipe.backend, seen, policy, "star")
    assert read is None and len(seen) == 1 + len(policy.recheck)
    assert torch.allclose(scores[:, 0], torch.tensor([c.score for c in res.irece.concepts]), atol=1e-4)
    assert adaptive.check_thresholds(policy, "star", seen, S.steps).tolist() == \
        pytest.approx([policy.threshold, *policy.recheck_threshold])


def test_pgd_against_the_policy_lowers_the_heads_scores_within_its_budget(pipe):
    from irece_runtime.policy import resolve
    low = resolve("gated", MODEL_DIR, ["star"], {"threshold": adaptive.MARGIN, "recheck_threshold": [0.0, 0.0]})
    refs = references("star", 2, False, 11)
    made = adaptive.pgd_references(pipe, refs, "star", low, [0, 3], S)
    assert made["losses"][-1] < 0.9 * made["losses"][0]


@pytest.mark.slow
def test_bench_adaptive_quick_writes_every_attack_and_defence_and_resumes(tmp_path, monkeypatch, capsys):
    from benchmarks import cache
    from irece_cli.main import main
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    out = tmp_path / "adaptive.json"
    argv = ["bench", "adaptive", "--quick", "--t-star", "0.5", "--json", str(out), "--chart", str(tmp_path / "a.png")]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    keys = {"attack", "access", "method", "defence", "concept", "crr", "n", "ci95", "budget"}
    assert all(keys <= set(r) for r in res["rows"])
    got = {(r["attack"], r["budget"], r["defence"]) for r in res["rows"]}
    assert got == {(a, b, d) for a, bs in adaptive.QUICK_BUDGETS.items() for b in bs for d in adaptive.ALL_DEFENCES}
    assert {r["access"] for r in res["rows"] if r["attack"] in ("ti", "pgd")} == {"white-box"}
    assert all(r["n"] == 2 and r["crr"] == r["k"] / 2 for r in res["rows"])
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun reads every finished (method, attack) back and attacks nothing
    for name in ("adaptive_ti", "pgd_references", "pgd_black_box", "prompt_search"):
        monkeypatch.setattr(adaptive, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert main(argv) == 0
    assert json.loads(out.read_text())["rows"] == res["rows"]
