"""ONNX export and the ONNX Runtime backend against torch; TensorRT where a GPU is present."""
import json

import numpy as np
import pytest
import torch

from irece_runtime.engines import TorchEngines
from irece_runtime.irece import IreceConfig
from irece_runtime.pipeline import Pipeline, Request
from miniworld import shapes

from .conftest import MODEL


@pytest.fixture(scope="module")
def erased_dir(tmp_path_factory):
    """A UCE-erased UNet (closed form, seconds) so the erased and standard engines differ."""
    from erasure.methods import erase
    out = tmp_path_factory.mktemp("uce-star")
    erase("uce", MODEL, "star", out)
    return out


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, erased_dir):
    from export.onnx_export import export_onnx
    out = tmp_path_factory.mktemp("engines")
    export_onnx(MODEL, erased_dir, out)
    return out


@pytest.fixture(scope="module")
def both(engine_dir, erased_dir):
    from export.ort_backend import OrtEngines
    return TorchEngines(MODEL, erased_dir), OrtEngines(engine_dir)


def test_manifest_records_sources_shapes_and_versions(engine_dir):
    m = json.loads((engine_dir / "manifest.json").read_text())
    assert m["opset"] == 17 and m["exporter"] == "torchscript" and m["precision"] == "fp32"
    assert any(k.startswith("unet/") for k in m["source_sha256"]) and any(k.startswith("erased/") for k in m["source_sha256"])
    assert m["versions"]["onnxruntime"] and m["shapes"]["tokens"] == 77
    assert set(m["components"]) == {"text_encoder", "vae_encoder", "vae_decoder", "unet_erased", "unet_standard",
                                    "localizer"}
    # the localizer drops everything after its last attention layer: fewer nodes and MACs than the full UNet
    stats = m["graph_stats"]
    assert stats["localizer"]["nodes"] < stats["unet_standard"]["nodes"]
    assert stats["localizer"]["macs"] < stats["unet_standard"]["macs"]


def test_each_component_matches_torch(both):
    te, oe = both
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, te.latent_channels, 8, 8, generator=g)
    h = torch.randn(2, 77, te.embed_dim, generator=g)
    t = torch.tensor(421)
    w = torch.zeros(2, 77)
    w[:, 4] = 1.0
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    pairs = {
        "text_encoder": (te.encode_text(te.embed_tokens(ids)), oe.encode_text(oe.embed_tokens(ids))),
        "vae_encoder": (te.vae_encode(img), oe.vae_encode(img)),
        "vae_decoder": (te.vae_decode(x), oe.vae_decode(x)),
        "unet_erased": (te.eps("erased", x, t, h), oe.eps("erased", x, t, h)),
        "unet_standard": (te.eps("standard", x, t, h), oe.eps("standard", x, t, h)),
        "localizer": (te.concept_map(x, t, h, w), oe.concept_map(x, t, h, w)),
    }
    for name, (a, b) in pairs.items():
        assert a.shape == b.shape, name
        assert (a - b).abs().max() <= 1e-4, (name, float((a - b).abs().max()))
    # batch is dynamic
    assert oe.eps("erased", x[:1], t, h[:1]).shape == (1, te.latent_channels, 8, 8)
    assert not torch.allclose(oe.eps("erased", x, t, h), oe.eps("standard", x, t, h))


def test_whole_pipeline_with_irece_on_onnx_runtime_matches_torch(both):
    te, oe = both
    pt, po = Pipeline.from_model_dir(te, MODEL), Pipeline.from_model_dir(oe, MODEL)
    cfg = IreceConfig(concepts=("star", "moon"))
    agree, diffs = [], []
    for seed, req in enumerate([Request(prompt="a red star on a black background"),
                                Request(prompt="a <x>", learned={"<x>": torch.randn(1, te.embed_dim)}),
                                Request(init_image=shapes.render("star", seed=3).image, invert_with="standard"),
                                Request(init_image=shapes.render("moon", seed=4).image)]):
        req.seed, req.steps = seed, 15
        a, b = pt.generate(req, cfg), po.generate(req, cfg)
        agree.append((a.irece.mask == b.irece.mask).float().mean().item())
        diffs.append(np.abs(a.images - b.images).mean())
    assert min(agree) >= 0.99, agree
    assert max(diffs) <= 2 / 255, diffs


def test_cli_export_and_generate_on_onnx(engine_dir, erased_dir, tmp_path):
    from irece_cli.main import main
    out = tmp_path / "o.png"
    assert main(["generate", "--model", str(MODEL), "--backend", "onnx", "--engines", str(engine_dir),
                 "--image", str(_render_png(tmp_path)), "--irece", "star", "--steps", "10", "--out", str(out),
                 "--json"]) == 0
    assert out.stat().st_size > 0


def _render_png(tmp_path):
    from PIL import Image
    p = tmp_path / "star.png"
    Image.fromarray(shapes.render("star", seed=0).image).save(p)
    return p


def test_engine_folder_without_manifest_is_refused(tmp_path):
    from export.ort_backend import OrtEngines
    with pytest.raises(FileNotFoundError, match="irece export"):
        OrtEngines(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU")
def test_tensorrt_engines_match_torch(engine_dir, erased_dir):
    pytest.importorskip("tensorrt")
    from export.trt_backend import TrtEngines, build_engines
    build_engines(engine_dir, fp16=False)
    te, tr = TorchEngines(MODEL, erased_dir, device="cuda"), TrtEngines(engine_dir)
    x = torch.randn(2, 4, 8, 8, device="cuda")
    h = torch.randn(2, 77, te.embed_dim, device="cuda")
    assert (te.eps("erased", x, torch.tensor(300), h) - tr.eps("erased", x, torch.tensor(300), h)).abs().max() < 1e-3


def test_tensorrt_refuses_foreign_engines():
    from export.manifest import EngineMismatch
    from export.trt_backend import check_engine_compat
    info = {"version": "10.9.0", "gpu": "NVIDIA H100 80GB HBM3", "precision": "fp16", "engines": {}}
    assert check_engine_compat(info, "10.9.0", "NVIDIA H100 80GB HBM3") is info
    with pytest.raises(EngineMismatch, match="TensorRT 10.9.0, this is 10.13"):
        check_engine_compat(info, "10.13.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(EngineMismatch, match="built for NVIDIA H100"):
        check_engine_compat(info, "10.9.0", "NVIDIA A10G")
    with pytest.raises(EngineMismatch, match="no TensorRT engines"):
        check_engine_compat(None, "10.9.0", "NVIDIA A10G")


def test_onnx_runtime_sessions_share_one_thread_pool(both):
    """A pool per session let the text encoder's and localizer's spinning threads slow the UNet steps after them
    (ORT request 1.5x slower, IRECE overhead 1.13x vs floor 1.03x; BENCHMARKS.md). All sessions must share one."""
    from export import ort_backend
    _, ort_engines = both
    assert ort_backend._SHARED_POOL is True
    assert len(ort_engines.sessions) >= 4
    assert all(not s.get_session_options().use_per_session_threads for s in ort_engines.sessions.values())
