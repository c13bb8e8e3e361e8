"""Erasure methods: UCE's effect, ESD/Receler training wired through, and loading erased UNets as users bring them."""
import pytest
import torch
from safetensors.torch import save_file

from benchmarks import batch
from erasure.methods import erase, generic_prompts
from irece_runtime.components import load_unet
from irece_runtime.loading import load_pipeline
from miniworld.judge import classify
from miniworld.prompts import concept_prompts, erase_prompts
from miniworld.shapes import CONCEPTS

from .conftest import MODEL, SHAPES10, random_latent


@pytest.fixture(scope="module")
def uce_star(tmp_path_factory, pipe):
    """UCE on `star`, with the mini world's own phrasings there (as `irece bench crr` erases) and generic ones on
    any other model; the preserve list defaults to the model's other concepts (concepts.json)."""
    out = tmp_path_factory.mktemp("uce")
    info = erase("uce", MODEL, "star", out, prompts=erase_prompts if SHAPES10 else generic_prompts)
    assert info["preserve"] == [c for c in pipe.vocabulary if c != "star"]
    if SHAPES10:
        assert info["preserve"] == [c for c in CONCEPTS if c != "star"]
    return out


def text_hidden(pipe, batch=1, seed=0):
    return torch.randn(batch, pipe.tokenizer.model_max_length, pipe.backend.embed_dim,
                       generator=torch.Generator().manual_seed(seed))


@pytest.mark.shapes10_only
def test_uce_erases_the_concept_and_keeps_the_others(uce_star, judge, pipe):
    erased = load_pipeline(MODEL, uce_star)
    prompts = concept_prompts("star", 10, 3)
    imgs, _ = batch.from_prompts(erased, prompts, list(range(10)), None)
    labels, _ = classify(judge, imgs)
    assert sum(lab == "star" for lab in labels) <= 2, labels
    others = [c for c in CONCEPTS if c != "star"]
    imgs, _ = batch.from_prompts(erased, [concept_prompts(c, 1, 5)[0] for c in others], list(range(20, 29)), None)
    labels, _ = classify(judge, imgs)
    assert sum(a == b for a, b in zip(labels, others)) >= 7, labels
    # the standard model draws those same star prompts
    imgs, _ = batch.from_prompts(pipe, prompts, list(range(10)), None)
    assert sum(lab == "star" for lab in classify(judge, imgs)[0]) >= 8


def test_uce_only_edits_cross_attention_keys_and_values(uce_star):
    base, erased = load_unet(MODEL), load_unet(uce_star)
    changed = {n for (n, a), (_, b) in zip(base.state_dict().items(), erased.state_dict().items())
               if not torch.equal(a, b)}
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)


@pytest.mark.parametrize("method", ["esd-x", "esd-u", "receler"])
def test_trained_erasers_save_and_reload(method, tmp_path, pipe):
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
        x, h = random_latent(pipe), text_hidden(pipe)
        with torch.no_grad():
            assert not torch.allclose(base(x, 500, h).sample, erased(x, 500, h).sample)


def test_unet_state_dict_in_safetensors_loads_like_the_folder(uce_star, tmp_path, pipe):
    """How users bring third-party erased SD v1.4 UNets: a bare state dict, architecture from the base model."""
    folder = load_unet(uce_star)
    path = tmp_path / "erased_unet.safetensors"
    save_file({k: v.contiguous() for k, v in folder.state_dict().items()}, str(path))
    bare = load_unet(path, MODEL)
    want, got = folder.state_dict(), bare.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x, h = random_latent(pipe, batch=2), text_hidden(pipe, batch=2)
    with torch.no_grad():  # same weights, same outputs (up to kernel choice on differently allocated tensors)
        assert (folder(x, 300, h).sample - bare(x, 300, h).sample).abs().max() <= 1e-5
    save_file({"not.a.unet": torch.zeros(1)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="not a UNet2DConditionModel state dict"):
        load_unet(tmp_path / "junk.safetensors", MODEL)
    with pytest.raises(ValueError, match="needs the base model folder"):
        load_unet(path)
