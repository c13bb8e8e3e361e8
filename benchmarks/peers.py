"""`irece bench peers`: our pipeline beside diffusers' StableDiffusionPipeline and optimum's
ORTStableDiffusionPipeline on the same model, prompts, seeds, DDIM steps and guidance, in one run.

Every system is a worker process (benchmarks/peers_worker.py) holding its loaded pipeline; after a warm-up the
orchestrator asks them for one image at a time, in a fresh random order every round with a pause between calls,
so drift and neighbour effects fall on all systems alike and no two ever run at once. Each worker times its own call
(prompt in, decoded image out) and reports its peak RSS. optimum-onnx pins transformers<4.58, older than ours,
so its worker runs in a second virtualenv (`make peers-env` -> .venv-peers).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from miniworld.assets import MODEL_DIR as DEFAULT_MODEL

from . import cache

REPO_ROOT = Path(__file__).resolve().parents[1]  # the peers venv is a development tool of the checkout
PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"
WORKER = Path(__file__).with_name("peers_worker.py")


@dataclass
class System:
    name: str  # shown in the table
    kind: str  # peers_worker --system
    irece: bool = False
    python: str = sys.executable
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    ms: list[float] = field(default_factory=list)

    def start(self, log_dir: Path, common: list[str]) -> None:
        cmd = [self.python, str(WORKER), "--system", self.kind, *common, *self.args] + (["--irece"] if self.irece else [])
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # the peers venv must not see this venv's packages
        self.log = log_dir / f"{self.name.replace(' ', '_').replace('+', 'p')}.log"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     text=True, env=env, cwd=REPO_ROOT)

    def image_path(self, out_dir: Path, seed: int) -> Path:
        return out_dir / f"{self.kind}{'_irece' if self.irece else ''}_{seed}.npy"

    def ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"peers worker {self.name!r} died (exit {self.proc.poll()}):\n{tail}")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def diffusers_folder(model_dir: Path, erased: Path | None) -> Path:
    """A diffusers folder that diffusers and optimum load as is: the model itself, or (with an erased UNet) the
    model's folders with that UNet in place of its own, cached by content."""
    if erased is None:
        return model_dir
    from irece_runtime.components import load_unet
    from irece_runtime.erasers import erasers_path
    if erasers_path(erased).exists():
        raise ValueError(f"--erased {erased}: Receler's erasers are our own modules; diffusers and optimum "
                         "cannot load them, so peers compares plain UNets only (UCE, ESD)")
    out = cache.key("peers-model", model=cache.model_fingerprint(str(model_dir)),
                    erased=cache.model_fingerprint(str(erased)))
    if not (out / "unet" / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        for item in model_dir.iterdir():
            if item.name != "unet" and not (out / item.name).exists():
                (out / item.name).symlink_to(item.resolve())
        load_unet(erased, model_dir).save_pretrained(out / "unet")
    return out


def our_engines(model_dir: Path, erased: Path | None) -> Path:
    """Our ONNX export of the model (+ erased UNet), built once and cached by content."""
    from export.onnx_export import export_onnx
    from irece_runtime.backends.graph import FORMAT, MANIFEST
    out = cache.key("peers-engines", model=cache.model_fingerprint(str(model_dir)),
                    erased=erased and cache.model_fingerprint(str(erased)), format=FORMAT)  # a new format re-exports
    if not (out / MANIFEST).exists():
        export_onnx(model_dir, erased, out)
    return out


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "mean_ms": float(a.mean()), "throughput_rps": float(1000 / a.mean()), "n": len(a)}


def run(model_dir: str | Path = DEFAULT_MODEL, erased: str | Path | None = None, engines: str | Path | None = None,
        steps: int = 25, n: int = 10, warmup: int = 2, n_check: int = 4, concept: str = "star",
        prompt: str | None = None, guidance: float = 5.0, device: str = "cpu",
        peers_python: str | Path | None = PEERS_PYTHON, out_dir: str | Path | None = None,
        systems: tuple[str, ...] | None = None, progress: bool = True, gap_s: float = 0.1) -> dict:
    model_dir = Path(model_dir)
    erased = Path(erased) if erased else None
    prompt = prompt or f"a red {concept} on a black background"
    out_dir = Path(out_dir or cache.CACHE_DIR / "peers-run")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    sd_dir = diffusers_folder(model_dir, erased)
    peers_python = peers_python or PEERS_PYTHON
    pool = [System("diffusers", "diffusers"), System("optimum", "optimum", python=str(peers_python))]
    pool += [System(f"irece {b}" + (" +IRECE" if on else ""), f"irece-{b}", irece=on)
             for b in ("torch", "onnx") for on in (False, True)]
    if systems:
        pool = [s for s in pool if s.name in systems or s.kind in systems]
    skipped = {}
    for s in [s for s in pool if s.kind == "optimum"]:
        if Path(peers_python).exists():
            s.args = ["--optimum-dir", str(cache.key("peers-optimum", model=cache.model_fingerprint(str(sd_dir))))]
        else:
            skipped["optimum"] = f"no peers virtualenv at {peers_python} (run `make peers-env`)"
            pool.remove(s)
    if not engines and any(s.kind == "irece-onnx" for s in pool):
        engines = our_engines(model_dir, erased)
    sample_size = json.loads((model_dir / "unet" / "config.json").read_text())["sample_size"]
    common = ["--model", str(sd_dir), "--model-ours", str(model_dir), "--prompt", prompt, "--steps", str(steps),
              "--guidance", str(guidance), "--sample-size", str(sample_size), "--device", device,
              "--concept", concept] + (["--graphs", str(engines)] if engines else []) + \
        (["--erased", str(erased)] if erased else [])
    for s in pool:
        s.start(out_dir, common)
    try:
        for s in pool:
            if not s._reply().get("ready"):
                raise RuntimeError(f"{s.name}: worker did not start")
        rounds = [(False, 10_000 + i) for i in range(warmup)] + [(True, i) for i in range(n)]  # (measured, seed)
        from tqdm import tqdm
        shuffle = np.random.default_rng(0)
        for measured, seed in tqdm(rounds, desc="peers rounds", disable=not progress):
            # a fresh order each round: a system that leaves spinning threads behind (ORT's per-session pools)
            # must not always slow the same neighbour
            order = [pool[i] for i in shuffle.permutation(len(pool))]
            for s in order:
                save = str(s.image_path(out_dir, seed)) if measured and seed < n_check else None
                ms = s.ask({"cmd": "run", "seed": seed, "save": save})["ms"]
                if measured:
                    s.ms.append(ms)
                time.sleep(gap_s)  # let the finished system's worker threads stop spinning
        stats = {s.name: s.ask({"cmd": "stats"}) for s in pool}
    finally:
        for s in pool:
            s.stop()

    images = {s.name: np.stack([np.load(s.image_path(out_dir, i)) for i in range(min(n, n_check))]) for s in pool}
    ref = next((s for s in pool if s.kind == "diffusers"), None)
    rows = []
    for s in pool:
        row = {"system": s.name, "kind": s.kind, "irece": s.irece, **_stats(s.ms),
               "peak_rss_mb": stats[s.name]["peak_rss_mb"], "gpu_peak_mb": stats[s.name]["gpu_peak_mb"]}
        if ref is not None:
            row["p50_vs_diffusers"] = row["p50_ms"] / float(np.percentile(ref.ms, 50))
            # same work? IRECE off must reproduce diffusers' image; IRECE on is compared with the same backend off
            base = ref if not s.irece else next(o for o in pool if o.kind == s.kind and not o.irece)
            d = np.abs(images[s.name] - images[base.name]) * 255
            row["vs"] = base.name
            row["max_abs_diff_255"], row["mean_abs_diff_255"] = float(d.max()), float(d.mean())
        rows.append(row)
    by = {r["system"]: r for r in rows}
    verdict = {}
    if "optimum" in by and "irece onnx +IRECE" in by:
        verdict["irece_onnx_irece_on_over_optimum_p50"] = by["irece onnx +IRECE"]["p50_ms"] / by["optimum"]["p50_ms"]
        verdict["irece_onnx_irece_off_over_optimum_p50"] = by["irece onnx"]["p50_ms"] / by["optimum"]["p50_ms"]
    return {"rows": rows, "verdict": verdict, "skipped": skipped, "steps": steps, "guidance": guidance,
            "prompt": prompt, "concept": concept, "device": device, "model": str(model_dir),
            "erased": str(erased) if erased else None, "warmup": warmup, "gap_s": gap_s,
            "versions": {s.name: stats[s.name]["versions"] for s in pool}}


def markdown(res: dict) -> str:
    lines = [f"Steps {res['steps']}, guidance {res['guidance']}, device {res['device']}, n = {res['rows'][0]['n']} "
             f"per system (interleaved, after {res['warmup']} warm-up rounds).", "",
             "| system | IRECE | p50 ms | p95 ms | p50 / diffusers | peak RSS MB | image vs | max / mean abs diff (/255) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['system']} | {'on' if r['irece'] else 'off'} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r.get('p50_vs_diffusers', float('nan')):.2f}x | {r['peak_rss_mb']:.0f} | {r.get('vs', '-')} | "
                     f"{r.get('max_abs_diff_255', float('nan')):.2f} / {r.get('mean_abs_diff_255', float('nan')):.2f} |")
    for k, v in res["verdict"].items():
        lines.append(f"\n{k}: {v:.2f}")
    for k, v in res["skipped"].items():
        lines.append(f"\nskipped {k}: {v}")
    return "\n".join(lines) + "\n"
