"""Named policies: the paper's IRECE and the recommended one, its numbers from the model's calibration block, fields
given explicitly on top; a missing head, a missing calibration or one made for other weights is refused, naming the
command that makes it."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from irece_cli.main import build_parser, irece_config_from_args
from irece_runtime.concept_head import HEAD_CONFIG, HEAD_DIR, HEAD_FILE
from irece_runtime.irece import IreceConfig
from irece_runtime.pipeline import Request
from irece_runtime.policy import CALIBRATION, POLICIES, RECOMMENDED, read_calibration, resolve
from miniworld.assets import MODEL_DIR
from server.cli import serve_overrides
from server.config import ServerConfig


def copy_head(tmp_path, calibrated: bool = True):
    """A model folder holding the mini world's concept head (and its calibration block, or not)."""
    shutil.copytree(MODEL_DIR / HEAD_DIR, tmp_path / HEAD_DIR)
    if not calibrated:
        config = tmp_path / HEAD_DIR / HEAD_CONFIG
        head = json.loads(config.read_text())
        head.pop(CALIBRATION)
        config.write_text(json.dumps(head))
    return tmp_path


def test_paper_policy_is_the_seed_papers_irece_and_needs_no_head(tmp_path):
    cfg = resolve("paper", tmp_path, ["star"])
    assert cfg == IreceConfig(concepts=("star",))
    assert (cfg.gate, cfg.t_star, cfg.tau, cfg.negative_guidance, cfg.recheck) == ("off", 0.3, 0.4, 0.0, ())


def test_recommended_policy_reads_its_numbers_from_the_models_calibration_block():
    block = read_calibration(MODEL_DIR)
    # where the numbers came from: a FPR budget, a calibration split, a held-out split of other seeds
    assert block["max_fpr"] > 0 and block["split"]["calibration"]["seed"] != block["split"]["held_out"]["seed"]
    cfg = resolve(None, MODEL_DIR, ["star"])
    assert RECOMMENDED == "gated" and cfg == resolve("gated", MODEL_DIR, ["star"])
    assert (cfg.t_star, cfg.tau, cfg.threshold) == (block["t_star"], block["tau"], block["threshold"])
    # the looks and each one's threshold, calibrated apart
    assert cfg.recheck == tuple(block["recheck"]) and cfg.recheck_threshold == tuple(block["recheck_threshold"])
    assert len(cfg.recheck) == len(cfg.recheck_threshold) >= 1
    for name, value in POLICIES["gated"].settings.items():
        assert getattr(cfg, name) == value, name
    assert cfg.gate == "head" and cfg.conditioning == "null" and cfg.keep_others and cfg.recheck


def test_a_field_given_explicitly_overrides_the_policy(tmp_path):
    cfg = resolve(None, MODEL_DIR, ["star"], {"threshold": 0.9, "negative_guidance": 0.0, "recheck": [0.8]})
    assert (cfg.threshold, cfg.negative_guidance, cfg.recheck) == (0.9, 0.0, (0.8,))
    assert cfg.recheck_threshold == ()  # a look the calibration never saw takes t*'s threshold
    assert cfg.gate == "head" and cfg.t_star == read_calibration(MODEL_DIR)["t_star"]  # the rest stays the policy's
    assert resolve("paper", tmp_path, ["star"], {"tau": 0.2}).tau == 0.2
    # calibrated fields all given: no calibration needed
    full = resolve("gated", tmp_path, ["star"], {"t_star": 0.5, "tau": 0.2, "threshold": 0.3, "recheck": []})
    assert (full.gate, full.threshold) == ("head", 0.3)
    with pytest.raises(ValueError, match="policy must be one of"):
        resolve("strong", MODEL_DIR, ["star"])


def test_a_missing_head_a_missing_calibration_and_a_stale_one_are_refused_with_the_command_that_fixes_them(tmp_path):
    with pytest.raises(ValueError, match=r"no concept head.*irece calibrate --model"):
        resolve("gated", tmp_path / "bare", ["star"])
    bare = copy_head(tmp_path / "uncalibrated", calibrated=False)
    with pytest.raises(ValueError, match=r"no calibration block: run `irece calibrate --model"):
        resolve("gated", bare, ["star"])
    stale = copy_head(tmp_path / "stale")
    weights = stale / HEAD_DIR / HEAD_FILE
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name] + 1e-3  # retrained: other weights than the calibration saw
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"other head weights \(stale\): run `irece calibrate --model"):
        resolve("gated", stale, ["star"])


def test_the_server_runs_the_recommended_policy_where_the_operator_names_concepts_and_no_policy(tmp_path):
    assert ServerConfig(concepts=["star"]).irece_config() == resolve("gated", MODEL_DIR, ["star"])
    assert ServerConfig(concepts=["star"], policy="paper").irece_config() == IreceConfig(concepts=("star",))
    over = ServerConfig(concepts=["star"], threshold=0.9, recheck=[]).irece_config()
    assert (over.gate, over.threshold, over.recheck) == ("head", 0.9, ())
    toml = tmp_path / "server.toml"
    toml.write_text('concepts = ["star"]\npolicy = "paper"\ngrow = 1\n')
    paper = ServerConfig.load(toml).irece_config()
    assert (paper.gate, paper.grow) == ("off", 1)
    # no concept of the operator's and no calibrated head: requests' own concepts get the paper's IRECE
    assert ServerConfig(model=str(tmp_path)).irece_config().gate == "off"
    with pytest.raises(ValueError, match="irece calibrate"):
        ServerConfig(model=str(tmp_path), concepts=["star"]).irece_config()


def test_the_deployed_config_runs_the_recommended_policy():
    from pathlib import Path
    deployed = ServerConfig.load(Path(__file__).parents[1] / "deploy" / "server.toml")
    assert deployed.irece_config().gate == "head"


@pytest.mark.parametrize("argv, gate, threshold", [
    ([], "head", None), (["--policy", "paper"], "off", 0.5), (["--threshold", "0.9"], "head", 0.9),
    (["--policy", "paper", "--gate", "head", "--threshold", "0.3", "--t-star", "0.5"], "head", 0.3)])
def test_generate_and_serve_flags_select_a_policy_and_override_its_fields(argv, gate, threshold):
    a = build_parser().parse_args(["generate", "--out", "x.png", "--irece", "star"] + argv)
    cfg = irece_config_from_args(a)
    assert cfg.gate == gate
    assert cfg.threshold == (read_calibration(MODEL_DIR)["threshold"] if threshold is None else threshold)
    s = build_parser().parse_args(["serve", "--concept", "star"] + argv)
    served = ServerConfig(**serve_overrides(s)).irece_config()
    assert served == cfg


def test_no_recheck_flag_turns_the_policys_rechecks_off():
    a = build_parser().parse_args(["generate", "--out", "x.png", "--irece", "star", "--recheck"])
    assert irece_config_from_args(a).recheck == ()


def test_a_gate_that_cannot_tell_presence_refuses_naming_the_fix():
    """No silent always-on: the classifier's softmax over one concept scores 1.0 for every image; a head gate needs
    a head. Each refuses with the command or setting that fixes it."""
    from types import SimpleNamespace

    from irece_runtime import gates
    bare = SimpleNamespace(vocabulary=(), head_concepts=())
    with pytest.raises(ValueError, match="always on.*vocabulary"):
        gates.check(bare, IreceConfig(concepts=("cat",), gate="classifier"))
    gates.check(bare, IreceConfig(concepts=("cat",), gate="classifier", vocabulary=("dog",)))  # two concepts: fine
    gates.check(SimpleNamespace(vocabulary=("dog",), head_concepts=()), IreceConfig(concepts=("cat",),
                                                                                   gate="classifier"))
    with pytest.raises(ValueError, match=r"no concept_head/.*irece calibrate"):
        gates.check(bare, IreceConfig(concepts=("cat",), gate="head"))
    with pytest.raises(ValueError, match="no output for 'cat'"):
        gates.check(SimpleNamespace(vocabulary=(), head_concepts=("dog",)), IreceConfig(concepts=("cat",), gate="head"))
    gates.check(bare, IreceConfig(concepts=("cat",)))  # the paper's IRECE asks no gate


def _token_embedding(pipe, word):
    """A learned embedding equal to a vocabulary word's own: its conditioning is the text prompt's, bit for bit."""
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    return {"<c>": pipe.backend.embed_tokens(torch.tensor([ids]))[0]}


def test_a_learned_embedding_the_head_sees_loses_its_whole_image_and_its_conditioning(pipe):
    """The same conditioning as a text prompt and as a learned embedding (the star token's own vector), the policy
    protecting star on the standard model (which draws it): the text request is re-noised where the head sees the
    star and keeps its prompt; the embedding's images are re-noised whole and lose their conditioning."""
    policy = resolve("gated", MODEL_DIR, ["star"])
    text = pipe.generate(Request(prompt="a star on a gray background", seed=3, steps=10, batch=2), policy)
    emb = pipe.generate(Request(prompt="a <c> on a gray background", learned=_token_embedding(pipe, "star"), seed=3,
                                steps=10, batch=2), policy)
    assert text.irece.intervened and emb.irece.intervened
    assert 0 < text.irece.mask_area < 1 and not text.irece.unconditioned
    assert emb.irece.mask_area == 1.0 and emb.irece.unconditioned


def test_the_head_reads_a_learned_embeddings_conditioning_where_it_does_not_see_the_target(pipe):
    """With the head's threshold out of reach (it never sees a target), only the classifier's reader of the
    conditioning can act, at the first look: an embedding that steers like "a star" is re-noised whole and
    unconditioned; the same conditioning as a text prompt, and an embedding of moon, come back as without IRECE."""
    blind = resolve("gated", MODEL_DIR, ["star"], {"threshold": 2.0, "recheck": []})
    star, moon = _token_embedding(pipe, "star"), _token_embedding(pipe, "moon")
    read = pipe.generate(Request(prompt="a <c> on a gray background", learned=star, seed=4, steps=10), blind)
    assert read.irece.mask_area == 1.0 and read.irece.unconditioned
    assert read.irece.concepts[0].conditioning_score >= blind.conditioning_threshold
    for req in (Request(prompt="a star on a gray background", seed=4, steps=10),
                Request(prompt="a <c> on a gray background", learned=moon, seed=4, steps=10)):
        on = pipe.generate(req, blind)
        assert not on.irece.intervened and np.array_equal(on.images, pipe.generate(req).images)


def test_a_model_folder_without_concepts_json_weighs_its_targets_against_the_shipped_vocabulary(tmp_path):
    """An SD folder has no concepts.json: the classifier gate weighs the operator's concept against the shipped
    default vocabulary (so it can tell presence: no refusal, no silent always-on); a concepts.json replaces it."""
    from types import SimpleNamespace

    from irece_runtime import gates
    from irece_runtime.pipeline import DEFAULT_VOCABULARY, model_vocabulary
    default = model_vocabulary(tmp_path)
    assert default == tuple(json.loads(DEFAULT_VOCABULARY.read_text())) and len(default) >= 10
    ctx = SimpleNamespace(vocabulary=default, head_concepts=())
    gates.check(ctx, IreceConfig(concepts=("cat",), gate="classifier"))
    assert gates.contrast_set(ctx, IreceConfig(concepts=("Van Gogh",), gate="classifier"))[0] == "Van Gogh"
    (tmp_path / "concepts.json").write_text(json.dumps(["cat"]))
    assert model_vocabulary(tmp_path) == ("cat",)
    with pytest.raises(ValueError, match="always on"):
        gates.check(SimpleNamespace(vocabulary=model_vocabulary(tmp_path), head_concepts=()),
                    IreceConfig(concepts=("cat",), gate="classifier"))
