"""One system under test for `irece bench peers`, in its own process (and, for optimum, its own virtualenv).

Speaks JSON lines on stdin/stdout, so the orchestrator can interleave systems one call at a time and no
process's memory or threads leak into another's figures. Only the `irece-*` systems import this project:
the optimum worker runs in the peers virtualenv (optimum-onnx pins an older transformers), from this file alone.

    -> {"cmd": "run", "seed": 3, "save": "out/x.npy" | null}   <- {"ms": 12.3}
    -> {"cmd": "stats"}                                         <- {"peak_rss_mb": ..., "gpu_peak_mb": ...}
    -> {"cmd": "quit"}
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

SYSTEMS = ("diffusers", "optimum", "irece-torch", "irece-onnx")


def initial_latents(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The same draw our pipeline makes for a seed (torch CPU generator), handed to diffusers and optimum as
    `latents=` so every system starts from identical noise."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class Diffusers:
    """diffusers' StableDiffusionPipeline (torch), or optimum's ORTStableDiffusionPipeline (a subclass of it)."""

    def __init__(self, a):
        if a.system == "optimum":
            from optimum.onnxruntime import ORTStableDiffusionPipeline
            provider = "CUDAExecutionProvider" if a.device == "cuda" else "CPUExecutionProvider"
            export_dir = Path(a.optimum_dir)
            if not (export_dir / "model_index.json").exists():  # optimum's own exporter, once, cached
                pipe = ORTStableDiffusionPipeline.from_pretrained(a.model, export=True)
                pipe.save_pretrained(export_dir)
                del pipe
            self.pipe = ORTStableDiffusionPipeline.from_pretrained(export_dir, provider=provider)
        else:
            from diffusers import StableDiffusionPipeline
            self.pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None,
                                                                requires_safety_checker=False).to(a.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.a = a
        self.latent_channels = json.loads((Path(a.model) / "unet" / "config.json").read_text())["in_channels"]

    def __call__(self, seed: int) -> np.ndarray:
        a = self.a
        x = initial_latents(seed, (1, self.latent_channels, a.sample_size, a.sample_size))
        if a.system == "diffusers":
            x = x.to(a.device)
        out = self.pipe(a.prompt, num_inference_steps=a.steps, guidance_scale=a.guidance, latents=x,
                        output_type="np")
        return np.asarray(out.images[0])


class Ours:
    def __init__(self, a):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from irece_runtime.irece import IreceConfig
        from irece_runtime.loading import load_pipeline
        from irece_runtime.pipeline import Request
        backend = a.system.removeprefix("irece-")
        self.pipe = load_pipeline(a.model_ours, a.erased, backend, a.graphs, device=a.device)
        self.cfg = IreceConfig(concepts=(a.concept,)) if a.irece else None
        self.Request, self.a = Request, a

    def __call__(self, seed: int) -> np.ndarray:
        a = self.a
        req = self.Request(prompt=a.prompt, steps=a.steps, guidance=a.guidance, seed=seed)
        return self.pipe.generate(req, self.cfg).images[0]


def peak_rss_mb() -> float:
    """VmHWM, this process's own high-water mark. (getrusage's ru_maxrss survives exec, so a worker would
    report its parent's peak if that was higher.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def versions() -> dict:
    from importlib import metadata
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "optimum", "optimum-onnx"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--model", required=True, help="diffusers folder (with the erased UNet where one is compared)")
    p.add_argument("--model-ours", help="our pipeline's standard model folder")
    p.add_argument("--erased")
    p.add_argument("--graphs")
    p.add_argument("--optimum-dir")
    p.add_argument("--irece", action="store_true")
    p.add_argument("--concept", default="star")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sample-size", type=int, required=True)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    system = Ours(a) if a.system.startswith("irece-") else Diffusers(a)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        if msg["cmd"] == "stats":
            gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if a.device == "cuda" else None
            print(json.dumps({"peak_rss_mb": peak_rss_mb(),
                              "gpu_peak_mb": gpu, "versions": versions()}), flush=True)
            continue
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        image = system(int(msg["seed"]))
        if a.device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000
        if msg.get("save"):
            np.save(msg["save"], np.asarray(image, dtype=np.float32), allow_pickle=False)
        print(json.dumps({"ms": ms}), flush=True)


if __name__ == "__main__":
    main()
