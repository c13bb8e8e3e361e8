"""`irece demo` (what `make demo` runs): the mini world end to end.

1. the committed Shapes-10 model draws every concept; the judge scores it;
2. erase one concept with UCE, attack it by white-box DDIM inversion, and let IRECE suppress it again: as the
   paper does it (always re-noising), behind the presence gate (threshold calibrated here, on renders the
   benchmarks never use) and behind the concept head's gate (grown masks, later looks at 0.7 and 0.9), which also
   leave benign requests (another concept) bit-identical;
3. serve the erased model over gRPC (`irece serve` with the full defence: the classifier gate at the calibrated
   threshold, conditioning dropped where the standard or the erased UNet reads the concept in it, looks again at 0.7 and 0.9), send
   one request per modality for the erased concept
   (the embedding: textual inversion learned on the erased model) and one benign request, and print each IRECE
   report (presence scores against threshold: the benign request passes untouched beside the suppressed ones) and
   the Prometheus metrics.
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

GATED_T_STAR = 0.5  # where the demo's gated IRECE scores and intervenes (see run())


def _grid(rows: list[np.ndarray], scale: int = 3) -> Image.Image:
    img = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    return Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)


def run(out: Path, concept: str = "star", per_concept: int = 8, n_attack: int = 16, benign: str = "moon") -> dict:
    import torch
    from benchmarks import batch as gen
    from benchmarks.tune import calibrate_gate
    from erasure.methods import erase
    from irece_runtime.irece import PRESENCE_GATE, RECHECK, IreceConfig
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
    # the classifier gate scores x0 as predicted at t*: at t* = 0.5 that prediction is sharp enough (held-out AUC
    # 0.90 against 0.83 at the paper's 0.3, BENCHMARKS.md), so the gated setting intervenes there
    cal = calibrate_gate(pipe, n=40, steps=25, max_fpr=0.03, t_star=GATED_T_STAR)  # standard model, from step 1
    threshold = cal["threshold"]
    print(f"     {PRESENCE_GATE} gate's presence threshold {threshold:.3f} (calibrated on 40 scenes: {cal['rule']})",
          flush=True)
    paper, gated = IreceConfig(concepts=(concept,)), IreceConfig(concepts=(concept,), gate=PRESENCE_GATE,
                                                                 threshold=threshold, t_star=GATED_T_STAR)
    settings = {"irece_paper": paper, "irece_gated": gated}
    if concept in pipe.head_concepts:  # the model folder's concept head (`irece world head`): one UNet row a look
        head_cal = calibrate_gate(pipe, n=40, steps=25, max_fpr=0.03, gate="head", t_star=GATED_T_STAR)
        print(f"     head gate's presence threshold {head_cal['threshold']:.3f} (calibrated on the same split)",
              flush=True)
        settings["irece_head"] = IreceConfig(concepts=(concept,), gate="head", threshold=head_cal["threshold"],
                                             t_star=GATED_T_STAR, grow=1, recheck=RECHECK)
        summary["head_threshold"] = head_cal["threshold"]
    text, _ = gen.from_prompts(epipe, [f"an image of a {concept}"] * n_attack, list(range(n_attack)), None)
    rng = np.random.default_rng(123)
    refs = np.stack([shapes.render(concept, rng=rng).image for _ in range(n_attack)])
    x_T = gen.invert_images(epipe, refs, "erased")
    attacked, _ = gen.from_latents(epipe, x_T, "", None)
    defended_paper, _ = gen.from_latents(epipe, x_T, "", paper)
    defended, masks = gen.from_latents(epipe, x_T, "", gated)
    runs = {"erased_text_prompt": text, "inversion_irece_off": attacked, "inversion_irece_paper": defended_paper,
            "inversion_irece_gated": defended}
    if "irece_head" in settings:
        runs["inversion_irece_head"] = gen.from_latents(epipe, x_T, "", settings["irece_head"])[0]
    crr = {name: float(shows(judge, imgs, concept).mean()) for name, imgs in runs.items()}
    for k, v in crr.items():
        print(f"     CRR {k:22s} {100 * v:5.1f}%  (n={n_attack})", flush=True)
    # benign: renders of another concept, inverted and regenerated, with IRECE on for the erased one
    others = np.stack([shapes.render(benign, rng=rng).image for _ in range(n_attack)])
    xb = gen.invert_images(epipe, others, "erased")
    plain, _ = gen.from_latents(epipe, xb, "", None)
    untouched = {name: float(np.mean([np.array_equal(a, b) for a, b in
                                      zip(plain, gen.from_latents(epipe, xb, "", c)[0])]))
                 for name, c in settings.items()}
    for k, v in untouched.items():
        print(f"     benign '{benign}' renders bit-identical to IRECE off, {k:12s} {100 * v:5.1f}%  (n={n_attack})",
              flush=True)
    f = shapes.SIZE // masks.shape[-1]
    mask_px = (np.kron(masks, np.ones((1, f, f)))[..., None] * np.array([255, 0, 0])).astype(np.uint8)
    _grid([refs, attacked, defended_paper, np.maximum(defended, mask_px // 3), defended]).save(out / "irece.png")
    summary["crr"], summary["benign_untouched"], summary["threshold"] = crr, untouched, threshold

    print("3/3  gRPC server with IRECE on the erased model: one request per modality", flush=True)
    summary["server"] = serve_and_call(erased, concept, out, refs[0], epipe, benign, threshold)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"outputs in {out}: grid.png (standard model), irece.png (references / attacked / paper IRECE / gated mask / gated IRECE), "
          f"server_*.png, summary.json — {summary['seconds']} s", flush=True)
    return summary


def serve_and_call(erased: Path, concept: str, out: Path, reference: np.ndarray, pipe, benign: str,
                   threshold: float) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from prometheus_client.parser import text_string_to_metric_families

    from irece_runtime.embeddings import save_learned_embedding
    from benchmarks.attacks import textual_inversion
    from irece_runtime.irece import PRESENCE_GATE, RECHECK
    from protos.irece.v1 import generation_pb2_grpc as pb_grpc
    from server import report
    from server.client import build_request

    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "irece_cli.main", "serve", "--model", str(DEFAULT_MODEL),
                             "--erased", str(erased), "--concept", concept, "--port", str(port),
                             "--metrics-port", str(metrics_port), "--gate", PRESENCE_GATE,
                             "--threshold", f"{threshold:.4f}", "--t-star", str(GATED_T_STAR),
                             # the full defence: an image the gate caught loses its conditioning, and a second look
                             "--conditioning", "null", "--recheck", *map(str, RECHECK)])
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
            # the attack on the embedding path: textual inversion learned on the erased model itself (white-box)
            vec = textual_inversion(pipe, "erased", concept, steps=200)
            save_learned_embedding(out / "learned_embeds.safetensors", {"<x>": vec})
            stub = pb_grpc.GenerationStub(ch)
            reports = {}
            for modality, req in (("text", build_request(f"a {concept} on a black background")),
                                  ("embedding", build_request("a <x> on a black background",
                                                              embedding=str(out / "learned_embeds.safetensors"))),
                                  ("inverted_latent", build_request("", image=str(out / "reference.png"))),
                                  ("benign text", build_request(f"a {benign} on a black background"))):
                resp = stub.Generate(req, timeout=120)
                (out / f"server_{modality}.png").write_bytes(resp.png)
                reports[modality] = report.to_dict(resp.irece)
                scores = " ".join(f"{c.score:.2f}" for c in resp.irece.concepts if c.score == c.score)
                gate = f" presence {scores} (t*, later looks) vs threshold {resp.irece.concepts[0].threshold:.2f}"
                print(f"     {modality:16s} intervened={resp.irece.intervened} mask_area={resp.irece.mask_area:.2f}"
                      f"{gate} unconditioned={resp.irece.unconditioned}", flush=True)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        shown = {}
        for fam in text_string_to_metric_families(body):
            if fam.name in ("irece_requests", "irece_interventions", "irece_suppression_ratio", "irece_localizations",
                            "irece_unconditioned"):
                for smp in fam.samples:
                    if smp.name.endswith("_created"):
                        continue
                    label = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
                    shown[f"{smp.name}{{{label}}}"] = smp.value
                    print(f"     {smp.name}{{{label}}} {smp.value:g}", flush=True)
        return {"reports": reports, "metrics": shown}
    finally:
        proc.terminate()
        proc.wait(timeout=60)

