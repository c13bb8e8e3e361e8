"""Erasure methods: UCE's effect, ESD/Receler training wired through, and loading erased UNets as users bring them."""
import pytest
import torch
from safetensors.torch import save_file

from benchmarks import batch
from irece_runtime.engines import load_unet
from erasure.methods import erase
from irece_runtime.loading import load_pipeline
from benchmarks.world_check import concept_prompts
from miniworld.judge import classify
from miniworld.shapes import CONCEPTS

from .conftest import MODEL


@pytest.fixture(scope="module")
def uce_star(tmp_path_factory):
    out = tmp_path_factory.mktemp("uce")
    info = erase("uce", MODEL, "star", out)
    assert info["preserve"] == [c for c in CONCEPTS if c != "star"]
    return out


def test_uce_erases_the_concept_and_keeps_the_others(uce_star, judge):
    pipe = load_pipeline(MODEL, uce_star)
    prompts = concept_prompts("star", 10, 3)
    imgs, _ = batch.from_prompts(pipe, prompts, list(range(10)), None)
    labels, _ = classify(judge, imgs)
    assert sum(lab == "star" for lab in labels) <= 2, labels
    others = [c for c in CONCEPTS if c != "star"]
    imgs, _ = batch.from_prompts(pipe, [concept_prompts(c, 1, 5)[0] for c in others], list(range(20, 29)), None)
    labels, _ = classify(judge, imgs)
    assert sum(a == b for a, b in zip(labels, others)) >= 7, labels
    # the standard model draws those same star prompts
    std = load_pipeline(MODEL)
    imgs, _ = batch.from_prompts(std, prompts, list(range(10)), None)
    assert sum(lab == "star" for lab in classify(judge, imgs)[0]) >= 8


def test_uce_only_edits_cross_attention_keys_and_values(uce_star):
    base, erased = load_unet(MODEL), load_unet(uce_star)
    changed = {n for (n, a), (_, b) in zip(base.state_dict().items(), erased.state_dict().items())
               if not torch.equal(a, b)}
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)


@pytest.mark.parametrize("method", ["esd-x", "esd-u", "receler"])
def test_trained_erasers_save_and_reload(method, tmp_path):
    out = tmp_path / method
    erase(method, MODEL, "moon", out, steps=3)
    base, erased = load_unet(MODEL), load_unet(out)
    changed = [n for (n, a), (_, b) in zip(base.state_dict().items(), erased.state_dict().items())
               if "receler" not in n and not torch.equal(a, b)]
    if method == "esd-x":
        assert changed and all(".attn2." in n for n in changed)
    elif method == "esd-u":
        assert changed and not any(".attn2." in n for n in changed)
    else:  # Receler leaves the UNet as is and adds erasers beside it
        assert not changed and hasattr(erased, "receler_erasers")
        x, h = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
        with torch.no_grad():
            assert not torch.allclose(base(x, 500, h).sample, erased(x, 500, h).sample)


def test_unet_state_dict_in_safetensors_loads_like_the_folder(uce_star, tmp_path):
    """How users bring third-party erased SD v1.4 UNets: a bare state dict, architecture from the base model."""
    folder = load_unet(uce_star)
    path = tmp_path / "erased_unet.safetensors"
    save_file({k: v.contiguous() for k, v in folder.state_dict().items()}, str(path))
    bare = load_unet(path, MODEL)
    x, h = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)
    with torch.no_grad():
        assert torch.equal(folder(x, 300, h).sample, bare(x, 300, h).sample)
    save_file({"not.a.unet": torch.zeros(1)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="not a UNet2DConditionModel state dict"):
        load_unet(tmp_path / "junk.safetensors", MODEL)
    with pytest.raises(ValueError, match="needs the base model folder"):
        load_unet(path)
