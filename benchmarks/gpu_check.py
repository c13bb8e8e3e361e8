"""One prepared GPU check (run by benchmarks/gpu_check.sh on a machine with a CUDA GPU):

1. Shapes-10: export ONNX, build TensorRT engines (fp32 and fp16), check parity against torch on CUDA for every
   component and for the whole pipeline with IRECE;
2. the SD v1.4 UNet architecture at random weights (UNet2DConditionModel defaults, cross_attention_dim=768,
   sample_size=64; CLIP ViT-L/14 text config): per-step UNet time, localizer time and peak memory for
   torch CUDA, ONNX Runtime CUDA and TensorRT fp16. Timing does not depend on the weight values.
3. peers (benchmarks/peers.py) on CUDA: Shapes-10 with every system; then a random-weights SD v1.4 folder
   (full UNet, CLIP ViT-L/14 text encoder, VAE; our tokenizer) with diffusers and our torch backend, IRECE off
   and on (our ONNX export of a >2 GB UNet needs external-data files, not attempted here), 25 steps, 512 px;
4. the renderer-free path on that architecture (`irece bench any-model`): head train, calibrate, serve, a request
   per modality, each command's exit status and time.
Prints one JSON object per section.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, n=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1000)


def shapes10(root: Path) -> dict:
    from export.onnx_export import export_onnx
    from irece_runtime.backends.onnxruntime_backend import OrtBackend
    from export.tensorrt_build import build_engines
    from irece_runtime.backends.tensorrt_backend import TrtBackend
    from irece_runtime.backends.torch_backend import TorchBackend
    from irece_runtime.irece import IreceConfig
    from irece_runtime.pipeline import Pipeline, Request
    from miniworld.assets import MODEL_DIR as model
    out = {}
    for prec in ("fp32", "fp16"):
        d = root / f"shapes10-{prec}"
        export_onnx(model, None, d)
        build_engines(d, fp16=prec == "fp16")
        te, tr = TorchBackend(model, device="cuda"), TrtBackend(d)
        x = torch.randn(2, 4, 8, 8, device="cuda")
        h = torch.randn(2, 77, te.embed_dim, device="cuda")
        w = torch.zeros(2, 77, device="cuda")
        w[:, 4] = 1
        t = torch.tensor(400)
        out[prec] = {"eps_max_abs": float((te.eps("erased", x, t, h) - tr.eps("erased", x, t, h)).abs().max()),
                     "map_max_abs": float((te.concept_map(x, t, h, w) - tr.concept_map(x, t, h, w)).abs().max())}
        pt, pr = Pipeline.from_model_dir(te, model), Pipeline.from_model_dir(tr, model)
        cfg = IreceConfig(concepts=("star",))
        a = pt.generate(Request(prompt="a red star on a black background", seed=1), cfg)
        b = pr.generate(Request(prompt="a red star on a black background", seed=1), cfg)
        out[prec]["mask_agreement"] = float((a.irece.mask.cpu() == b.irece.mask.cpu()).float().mean())
        out[prec]["image_mean_abs_255"] = float(np.abs(a.images - b.images).mean() * 255)
    ort = OrtBackend(root / "shapes10-fp32")
    out["onnxruntime_providers"] = ort.providers
    return out


def sd14_architecture(root: Path) -> dict:
    """SD v1.4 shapes at random weights: UNet step and localizer times, peak memory."""
    from diffusers import UNet2DConditionModel
    from irece_runtime.components import UNetEps
    from irece_runtime.attention import Localizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval().cuda()
    res = {"params_M": sum(p.numel() for p in unet.parameters()) / 1e6}
    x = torch.randn(2, 4, 64, 64, device="cuda")
    h = torch.randn(2, 77, 768, device="cuda")
    t = torch.tensor([500.0], device="cuda")
    w = torch.zeros(1, 77, device="cuda")
    w[:, 5] = 1
    for dtype in (torch.float32, torch.float16):
        u = unet.to(dtype)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            step = timed(lambda: u(x.to(dtype), t, h.to(dtype)).sample)
        mem = torch.cuda.max_memory_allocated() / 2 ** 20
        loc_unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval().cuda().to(dtype)
        loc_unet.load_state_dict(u.state_dict())
        loc = Localizer(loc_unet)
        with torch.no_grad():
            lt = timed(lambda: loc(x[:1].to(dtype), t, h[:1].to(dtype), w.to(dtype)))
        res[f"torch_{str(dtype).split('.')[-1]}"] = {"unet_step_cfg_ms": step, "localizer_ms": lt,
                                                     "localizer_over_step": lt / step, "peak_mem_mb": mem}
    try:  # TensorRT fp16 of the same graphs: the erased-UNet step (CFG batch 2) and the localizer (batch 1)
        import tensorrt as trt
        from export.tensorrt_build import build_engine
        from irece_runtime.backends.tensorrt_backend import TrtModule
        unet = unet.float()
        d = root / "sd14"
        d.mkdir(exist_ok=True)
        loc_unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval().cuda()
        loc_unet.load_state_dict(unet.state_dict())
        graphs = {"unet": (UNetEps(unet), (x[:1], t, h[:1]), ["sample", "timestep", "encoder_hidden_states"],
                           {"sample": {0: "B"}, "encoder_hidden_states": {0: "B"}}),
                  "localizer": (Localizer(loc_unet), (x[:1], t, h[:1], w),
                                ["sample", "timestep", "encoder_hidden_states", "token_weights"], {})}
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        stream = torch.cuda.Stream()
        mods = {}
        for name, (mod, args, inputs, axes) in graphs.items():
            with torch.no_grad():
                torch.onnx.export(mod, args, str(d / f"{name}.onnx"), input_names=inputs, output_names=["out"],
                                  dynamic_axes=axes, opset_version=17, dynamo=False)
            build_engine(d / f"{name}.onnx", d / f"{name}.engine", True, 2, d / "timing.cache")
            mods[name] = TrtModule(d / f"{name}.engine", runtime, stream)
        torch.cuda.reset_peak_memory_stats()
        step = timed(lambda: mods["unet"](sample=x, timestep=t, encoder_hidden_states=h))
        lt = timed(lambda: mods["localizer"](sample=x[:1], timestep=t, encoder_hidden_states=h[:1], token_weights=w))
        res["tensorrt_fp16"] = {"version": trt.__version__, "unet_step_cfg_ms": step, "localizer_ms": lt,
                                "localizer_over_step": lt / step,
                                "torch_peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20}
    except Exception as exc:  # report, do not hide
        res["tensorrt_error"] = f"{type(exc).__name__}: {exc}"
    return res


def random_sd14_folder(out: Path, sample_size: int = 64, unet_channels=(320, 640, 1280, 1280), text_width: int = 768,
                       text_layers: int = 12, vae_channels=(128, 256, 512, 512)) -> Path:
    """SD v1.4's architecture in diffusers folder layout at random weights (timing does not depend on them). Smaller
    widths keep the architecture (4 UNet levels with cross-attention, 8x VAE, CLIP text encoder) for a CPU run of
    the model-agnostic tests: IRECE_TEST_MODEL=<folder> pytest."""
    import shutil

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from miniworld.assets import MODEL_DIR as DEFAULT_MODEL
    from miniworld.train import text_encoder_sd_layout
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=text_width,
                         block_out_channels=tuple(unet_channels)).save_pretrained(out / "unet")
    CLIPTextModel(CLIPTextConfig(hidden_size=text_width, intermediate_size=4 * text_width,
                                 num_hidden_layers=text_layers, num_attention_heads=max(1, text_width // 64),
                                 max_position_embeddings=77, projection_dim=text_width,
                                 hidden_act="quick_gelu")).save_pretrained(out / "text_encoder")
    text_encoder_sd_layout(out / "text_encoder")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                  sample_size=sample_size * 8, block_out_channels=tuple(vae_channels),
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(out / "vae")
    DDIMScheduler.from_pretrained(DEFAULT_MODEL / "scheduler").save_pretrained(out / "scheduler")
    shutil.copytree(DEFAULT_MODEL / "tokenizer", out / "tokenizer")
    shutil.copy(DEFAULT_MODEL / "model_index.json", out / "model_index.json")
    return out


def peers_cuda(root: Path) -> dict:
    from benchmarks import peers
    out = {"shapes10": peers.run(steps=25, n=10, device="cuda", out_dir=root / "peers-shapes10", progress=False)}
    sd = random_sd14_folder(root / "sd14-random")
    out["sd14_random"] = peers.run(sd, steps=25, n=5, device="cuda", out_dir=root / "peers-sd14", progress=False,
                                   systems=("diffusers", "irece-torch"), concept="cat")
    return out


def any_model_cuda(root: Path) -> dict:
    """The renderer-free path (`irece bench any-model`) on the full SD v1.4 architecture at random weights, on CUDA:
    head train -> calibrate -> serve -> one request per modality, each command's exit status and seconds."""
    from benchmarks import any_model
    return any_model.run(device="cuda", n=8, steps=10, timeout=240)


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU"}))
        sys.exit(1)
    root = Path(tempfile.mkdtemp())
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}))
    for name, fn in (("shapes10", shapes10), ("sd14_architecture", sd14_architecture),
                     ("peers", peers_cuda), ("any_model", any_model_cuda)):
        t0 = time.time()
        try:
            out = fn(root)
        except Exception as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({name: out, "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
