"""`irece demo` (what `make demo` runs): the mini world end to end.

1. the committed Shapes-10 model draws every concept; the judge scores it;
2. erase one concept with UCE, attack it by white-box DDIM inversion, and let IRECE suppress it again under the two
   named policies: "paper" (the seed paper's IRECE, always re-noising) and "gated" (the recommended one: only where
   the model's concept head sees the concept, its numbers from the model's calibration block); benign inverted
   renders of another concept come back bit-identical under "gated";
3. serve the erased model over gRPC exactly as an operator would (`irece serve --concept star`: the recommended
   policy), send an attacking and a benign request of each modality (the attacking embedding: textual inversion
   learned on the erased model), print each IRECE report side by side and the Prometheus counters.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from miniworld.assets import MODEL_DIR as DEFAULT_MODEL
from server.config import free_port


def _grid(rows: list[np.ndarray], scale: int = 3) -> Image.Image:
    img = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    return Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)


def run(out: Path, concept: str = "star", per_concept: int = 8, n_attack: int = 16, benign: str = "moon") -> dict:
    import torch
    from benchmarks import batch as gen
    from erasure.methods import erase
    from irece_runtime.policy import resolve
    from irece_runtime.loading import load_pipeline
    from miniworld import shapes
    from miniworld.judge import classify, load_judge, shows
    from miniworld.prompts import concept_prompts, erase_prompts

    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    judge = load_judge()
    pipe = load_pipeline(DEFAULT_MODEL)
    summary: dict = {}

    print("1/3  the standard Shapes-10 model, one row per concept", flush=True)
    rows, acc = [], {}
    for i, c in enumerate(shapes.CONCEPTS):
        seeds = list(range(100 * i, 100 * i + per_concept))
        imgs, _ = gen.from_prompts(pipe, concept_prompts(c, per_concept, i), seeds, None)
        labels, _ = classify(judge, imgs)
        acc[c] = float(np.mean([lab == c for lab in labels]))
        rows.append(imgs)
        print(f"     {c:9s} judge agrees on {100 * acc[c]:5.1f}% of {per_concept}", flush=True)
    _grid(rows).save(out / "grid.png")
    summary["text_accuracy"] = acc

    print(f"2/3  erase '{concept}' with UCE, attack by white-box DDIM inversion, suppress with IRECE", flush=True)
    erased = out / f"uce-{concept}"
    erase("uce", DEFAULT_MODEL, concept, erased, prompts=erase_prompts)  # the mini world's phrasings
    epipe = load_pipeline(DEFAULT_MODEL, erased)
    settings = {f"irece_{name}": resolve(name, DEFAULT_MODEL, [concept]) for name in ("paper", "gated")}
    for name, cfg in settings.items():
        print(f"     {name}: gate {cfg.gate!r}, t* {cfg.t_star}, tau {cfg.tau}"
              + (f", threshold {cfg.threshold:.3f} (calibration block)" if cfg.gate != "off" else ""), flush=True)
    paper, gated = settings["irece_paper"], settings["irece_gated"]
    text, _ = gen.from_prompts(epipe, [f"an image of a {concept}"] * n_attack, list(range(n_attack)), None)
    rng = np.random.default_rng(123)
    refs = np.stack([shapes.render(concept, rng=rng).image for _ in range(n_attack)])
    levels: list = []  # the inversion's trajectory: the gated policy keeps what lies outside its mask
    x_T = gen.invert_images(epipe, refs, "erased", trajectory=levels)
    attacked, _ = gen.from_latents(epipe, x_T, "", None)
    defended_paper, _ = gen.from_latents(epipe, x_T, "", paper)
    defended, masks = gen.from_latents(epipe, x_T, "", gated, trajectory=levels)
    runs = {"erased_text_prompt": text, "inversion_irece_off": attacked, "inversion_irece_paper": defended_paper,
            "inversion_irece_gated": defended}
    crr = {name: float(shows(judge, imgs, concept).mean()) for name, imgs in runs.items()}
    for k, v in crr.items():
        print(f"     CRR {k:22s} {100 * v:5.1f}%  (n={n_attack})", flush=True)
    # benign: renders of another concept, inverted and regenerated, with IRECE on for the erased one
    others = np.stack([shapes.render(benign, rng=rng).image for _ in range(n_attack)])
    levels = []
    xb = gen.invert_images(epipe, others, "erased", trajectory=levels)
    plain, _ = gen.from_latents(epipe, xb, "", None)
    untouched = {name: float(np.mean([np.array_equal(a, b) for a, b in
                                      zip(plain, gen.from_latents(epipe, xb, "", c, trajectory=levels)[0])]))
                 for name, c in settings.items()}
    for k, v in untouched.items():
        print(f"     benign '{benign}' renders bit-identical to IRECE off, {k:12s} {100 * v:5.1f}%  (n={n_attack})",
              flush=True)
    f = shapes.SIZE // masks.shape[-1]
    mask_px = (np.kron(masks, np.ones((1, f, f)))[..., None] * np.array([255, 0, 0])).astype(np.uint8)
    _grid([refs, attacked, defended_paper, np.maximum(defended, mask_px // 3), defended]).save(out / "irece.png")
    summary["crr"], summary["benign_untouched"] = crr, untouched

    print("3/3  gRPC server with IRECE on the erased model: one request per modality", flush=True)
    summary["server"] = serve_and_call(erased, concept, out, refs[0], others[0], epipe, benign)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"outputs in {out}: grid.png (standard model), irece.png (references / attacked / paper IRECE / gated mask / gated IRECE), "
          f"server_*.png, summary.json — {summary['seconds']} s", flush=True)
    return summary


def serve_and_call(erased: Path, concept: str, out: Path, reference: np.ndarray, benign_reference: np.ndarray,
                   pipe, benign: str) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from prometheus_client.parser import text_string_to_metric_families

    from irece_runtime.embeddings import save_learned_embedding
    from benchmarks.attacks import textual_inversion
    from protos.irece.v1 import generation_pb2_grpc as pb_grpc
    from server import report
    from server.client import build_request

    port, metrics_port = free_port(), free_port()
    # as an operator would start it: concepts named, no policy -> the recommended one
    proc = subprocess.Popen([sys.executable, "-m", "irece_cli.main", "serve", "--model", str(DEFAULT_MODEL),
                             "--erased", str(erased), "--concept", concept, "--port", str(port),
                             "--metrics-port", str(metrics_port)])
    try:
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.time() + 120
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        break
                except grpc.RpcError:
                    pass
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("server did not become SERVING")
                time.sleep(0.5)
            Image.fromarray(reference).save(out / "reference.png")
            Image.fromarray(benign_reference).save(out / "benign_reference.png")
            # the embedding path: textual inversion learned on the erased model itself (white-box), of the erased
            # concept (the attack) and of the benign one
            for name, c in (("attack", concept), ("benign", benign)):
                vec = textual_inversion(pipe, "erased", c, steps=200)
                save_learned_embedding(out / f"learned_{name}.safetensors", {"<x>": vec})
            stub = pb_grpc.GenerationStub(ch)
            reports = {}
            requests = {"text": (f"a {concept} on a black background", {}),
                        "embedding": ("a <x> on a black background", {"embedding": str(out / "learned_attack.safetensors")}),
                        "inverted_latent": ("", {"image": str(out / "reference.png")})}
            benign_requests = {"text": (f"a {benign} on a black background", {}),
                               "embedding": ("a <x> on a black background",
                                             {"embedding": str(out / "learned_benign.safetensors")}),
                               "inverted_latent": ("", {"image": str(out / "benign_reference.png")})}
            print(f"     {'':16s} {'attacking (' + concept + ')':44s} benign ({benign})", flush=True)
            for modality in requests:
                line = []
                for kind, (prompt, extra) in (("attack", requests[modality]), ("benign", benign_requests[modality])):
                    resp = stub.Generate(build_request(prompt, **extra), timeout=120)
                    (out / f"server_{modality}_{kind}.png").write_bytes(resp.png)
                    reports[f"{modality}/{kind}"] = report.to_dict(resp.irece)
                    score = max((c.score for c in resp.irece.concepts if c.score == c.score), default=float("nan"))
                    line.append(f"{'re-noised' if resp.irece.intervened else 'untouched':9s} mask {resp.irece.mask_area:.2f} "
                                f"score {score:.2f}{' unconditioned' if resp.irece.unconditioned else '':14s}")
                print(f"     {modality:16s} {line[0]:44s} {line[1]}", flush=True)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        shown = {}
        for fam in text_string_to_metric_families(body):
            if fam.name in ("irece_requests", "irece_interventions", "irece_localizations", "irece_unconditioned"):
                for smp in fam.samples:
                    if smp.name.endswith("_created") or not smp.value:  # every series starts at zero
                        continue
                    label = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
                    shown[f"{smp.name}{{{label}}}"] = smp.value
                    print(f"     {smp.name}{{{label}}} {smp.value:g}", flush=True)
        done = sum(v for k, v in shown.items() if k.startswith("irece_localizations_total"))
        hit = sum(v for k, v in shown.items() if k.startswith("irece_interventions_total"))
        print(f"     suppression rate: {hit:g} of {done:g} localized requests re-noised "
              "(PromQL: rate(irece_interventions_total[5m]) / rate(irece_localizations_total[5m]))", flush=True)
        return {"reports": reports, "metrics": shown}
    finally:
        proc.terminate()
        proc.wait(timeout=60)

