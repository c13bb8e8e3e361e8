"""`irece` command line, the one command host: every package registers its own verbs here (world: miniworld,
`world check`: benchmarks; erase: erasure; export; serve and client: server; bench: benchmarks); generate and demo
are the host's own."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from erasure.cli import register as register_erase
from irece_runtime.irece import CONDITIONING, CONDITIONING_UNETS, GATES, PERTURB_MODES, IreceConfig, IreceReport, parse_t_star
from miniworld.assets import MODEL_DIR as DEFAULT_MODEL
from miniworld.cli import register_world

from .output import emit, load_png, save_png

DEFAULTS = IreceConfig.defaults()


def cmd_world_check(a):
    from irece_runtime.loading import load_pipeline
    from benchmarks.world_check import check
    emit(check(load_pipeline(a.model), a.judge, n=a.n, n_judge=a.n_judge), a.json)


# -- generate ------------------------------------------------------------------------------------------------
# the flags of IreceConfig fields: left unset (None) they come from the policy
IRECE_FLAGS = ("tau", "t_star", "mode", "template", "gate", "threshold", "conditioning", "conditioning_unet", "grow",
               "negative_guidance", "negative_guidance_steps", "negative_guidance_every", "keep_outside", "keep_others",
               "recheck")


def irece_config_from_args(a) -> IreceConfig | None:
    """--irece's concepts under --policy (default: the recommended one), with the flags given on top."""
    if not a.irece:
        return None
    from irece_runtime.policy import resolve
    overrides = {k: getattr(a, k) for k in IRECE_FLAGS if getattr(a, k) is not None}
    if a.keep_others and a.keep_outside is None:
        overrides["keep_outside"] = True
    return resolve(a.policy, a.model, a.irece, overrides)


def cmd_generate(a):
    from irece_runtime.loading import load_pipeline
    from irece_runtime.pipeline import Request
    layers = tuple(a.localizer_layers) if a.localizer_layers else None
    pipe = load_pipeline(a.model, a.erased, a.backend, a.graphs, layers=layers)
    learned = None
    if a.embedding:
        from irece_runtime.embeddings import load_learned_embedding
        learned = load_learned_embedding(a.embedding, a.token)
    req = Request(prompt=a.prompt or "", negative_prompt=a.negative_prompt, learned=learned,
                  init_image=load_png(a.image) if a.image else None, invert_with=a.invert_with,
                  steps=a.steps, guidance=a.guidance, seed=a.seed)
    cfg = irece_config_from_args(a)
    if cfg is not None:
        from irece_runtime import gates
        gates.check(pipe, cfg)  # a gate that cannot tell presence refuses, naming the fix
    if cfg is not None and cfg.gate == "head":
        from irece_runtime.irece import off_schedule_warning
        warning = off_schedule_warning(cfg, pipe.head_trained_at, req.steps)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    res = pipe.generate(req, cfg)
    save_png(res.uint8()[0], Path(a.out))
    report = res.irece if res.irece is not None else IreceReport()  # no concept: the empty report, as the server's
    emit({"output": a.out, "modality": req.modality, "irece": report.to_dict(),
          "timings_s": {k: round(v, 4) for k, v in res.timings.items()}}, a.json)


def cmd_calibrate(a):
    from irece_runtime.calibration import calibrate
    from irece_runtime.loading import load_pipeline
    from irece_runtime.policy import head_tau, write_calibration
    tau = a.tau if a.tau is not None else head_tau(a.model)
    block = calibrate(load_pipeline(a.model, device=a.device), n=a.n, n_held_out=a.n_held_out, max_fpr=a.max_fpr, tau=tau,
                      steps=a.steps, t_star=a.t_star, looks=tuple(a.looks), check=a.check)
    path = write_calibration(a.model, block)
    emit({"written": str(path), **block}, a.json)


def cmd_head_train(a):
    from irece_runtime.head_training import train
    from irece_runtime.pipeline import model_vocabulary
    concepts = tuple(a.concepts or model_vocabulary(a.model))
    res = train(a.model, concepts, n=a.n, epochs=a.epochs, minutes=a.minutes, cache=a.cache, check=a.check,
                device=a.device, images=a.images)
    emit(res, a.json)


def cmd_demo(a):
    from .demo import run
    run(Path(a.out), concept=a.concept)


def add_irece_flags(p):
    from irece_runtime.policy import POLICIES, RECOMMENDED
    p.add_argument("--irece", action="append", metavar="CONCEPT", help="concept to suppress with IRECE (repeatable)")
    p.add_argument("--policy", choices=tuple(POLICIES),
                   help=f"named defence (default: {RECOMMENDED!r}, the recommended one; 'paper': the seed paper's "
                        "always-on IRECE); the flags below override its fields")
    p.add_argument("--tau", type=float, help=f"localization threshold (paper: {DEFAULTS.tau})")
    p.add_argument("--t-star", type=parse_t_star,
                   help=f"intervention step: a fraction (0.3) or a step index (7) (paper: {DEFAULTS.t_star})")
    p.add_argument("--mode", choices=PERTURB_MODES)
    p.add_argument("--template", help=f"localization prompt (default: {DEFAULTS.template!r})")
    p.add_argument("--gate", choices=GATES,
                   help="off: always intervene (the paper); head (the model folder's concept head) or classifier (a "
                        "diffusion classifier on the standard UNet): only where the concept is present")
    p.add_argument("--threshold", type=float, help="presence gate's threshold")
    p.add_argument("--conditioning", choices=CONDITIONING,
                   help="after IRECE re-noises an image: keep its conditioning (the paper) or denoise it on the null "
                        "prompt from then on (null: a learned embedding cannot redraw the concept)")
    p.add_argument("--conditioning-unet", choices=CONDITIONING_UNETS,
                   help="classifier gate, --conditioning null: which UNet reads the conditioning: standard (does it "
                        "name the concept), erased (does it steer the model that draws towards it) or both")
    p.add_argument("--grow", type=int, help="cells by which IRECE's mask grows before re-noising")
    p.add_argument("--negative-guidance", type=float, metavar="G",
                   help="steer the regions IRECE re-noised away from their concepts with this scale (standard UNet; "
                        "paper: 0)")
    p.add_argument("--negative-guidance-steps", type=int, metavar="K",
                   help="steer only the K steps after each re-noising (0: to the end)")
    p.add_argument("--negative-guidance-every", type=int, metavar="E",
                   help="the standard UNet's steering direction computed every E steps and reused between (1: each "
                        "step)")
    p.add_argument("--keep-outside", action=argparse.BooleanOptionalAction,
                   help="inverted images: once IRECE re-noised an image, only its mask is redrawn; every pixel outside "
                        "it stays the input's")
    p.add_argument("--keep-others", action=argparse.BooleanOptionalAction,
                   help="with the head gate (implies --keep-outside): inside the mask too, the pixels where the "
                        "concept head saw another concept more probable than the targets stay the input's")
    p.add_argument("--recheck", nargs="*", type=parse_t_star, metavar="T",
                   help="later points of the schedule where IRECE runs again (fractions or step indices; none: no "
                        "recheck)")
    p.add_argument("--localizer-layers", nargs="+", metavar="NAME",
                   help="cross-attention layers the localizer averages (name substrings, e.g. up_blocks); "
                        "default: all (torch backend; exported graphs fix theirs at export)")


def build_parser() -> argparse.ArgumentParser:
    from irece_runtime.head_training import EPOCHS, N_ITEMS
    ap = argparse.ArgumentParser(prog="irece", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    world = sub.add_parser("world", help="the Shapes-10 mini world").add_subparsers(dest="world_cmd", required=True)
    register_world(world)
    p = world.add_parser("check", help="judge accuracy and text-prompt accuracy of the standard model")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--judge")
    p.add_argument("--n", type=int, default=50, help="generations per concept")
    p.add_argument("--n-judge", type=int, default=2000, help="held-out renders for judge accuracy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_world_check)

    p = sub.add_parser("generate", help="generate one image, optionally with IRECE")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="standard model folder (diffusers layout)")
    p.add_argument("--erased", help="erased UNet (diffusers folder or .safetensors state dict)")
    p.add_argument("--backend", choices=("torch", "onnx", "tensorrt"), default="torch")
    p.add_argument("--graphs", help="exported graph folder from `irece export` (onnx/tensorrt backends)")
    p.add_argument("--prompt", help="text prompt (with the placeholder token for --embedding)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--embedding", help="learned embedding file (.safetensors, .bin, .pt, .npy)")
    p.add_argument("--token", help="placeholder token for the embedding (default: as stored in the file)")
    p.add_argument("--image", help="reference image to invert (inverted-latent request)")
    p.add_argument("--invert-with", choices=("erased", "standard"), default="erased")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    add_irece_flags(p)
    p.set_defaults(func=cmd_generate)

    register_erase(sub, str(DEFAULT_MODEL))

    p = sub.add_parser("calibrate", help="the policy's thresholds from the model's own generations, written beside "
                                         "its concept head (concept_head/config.json)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder with a concept head")
    p.add_argument("--n", type=int, default=240, help="calibration prompts (default: %(default)s)")
    p.add_argument("--n-held-out", type=int, default=120, help="held-out prompts (default: %(default)s)")
    p.add_argument("--max-fpr", type=float, default=0.03, help="false-positive budget (default: %(default)s)")
    p.add_argument("--tau", type=float, help="the head's cell probability for a mask cell (default: the one `irece "
                   "head train` chose and stored with the head, else 0.2)")
    p.add_argument("--t-star", type=float, help="default: where the head was trained")
    p.add_argument("--looks", nargs="*", type=float, default=[0.7, 0.9], metavar="T",
                   help="the recheck looks, each calibrated apart (default: %(default)s)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="leave out prompts whose image the model's diffusion classifier does not find their concepts in")
    p.add_argument("--device", default="cpu", help="torch device (cuda on a GPU)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    head = sub.add_parser("head", help="the model folder's concept head").add_subparsers(dest="head_cmd", required=True)
    p = head.add_parser("train", help="train the concept head of any SD v1.x folder from its own generations (no "
                                      "labelled images); then `irece calibrate --model M`")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="standard model folder (diffusers layout)")
    p.add_argument("--concepts", nargs="+", metavar="C",
                   help="the head's concepts: those to erase and those a user may ask for beside them (default: the "
                        "model's vocabulary, concepts.json or irece_runtime/vocabulary.json)")
    p.add_argument("--n", type=int, default=N_ITEMS, help="generated images (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="fit epochs (default: %(default)s)")
    p.add_argument("--minutes", type=float,
                   help="budget for the whole run: 80%% to generating (fewer images if need be), the rest to the fit "
                        "(fewer epochs); the head's config records what ran")
    p.add_argument("--images", metavar="DIR",
                   help="the operator's own pictures with masks, learnt from beside the generations: DIR/<name>.png "
                        "(or .jpg) and DIR/masks/<name>.<concept>.png (nonzero pixels: the concept; a picture without "
                        "a mask shows none)")
    p.add_argument("--cache", default=".cache/head", help="generated chunks, reused by a rerun (default: %(default)s)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="keep only images whose prompt's concepts the model's diffusion classifier finds")
    p.add_argument("--device", default="cpu", help="torch device (cuda on a GPU)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_head_train)

    p = sub.add_parser("demo", help="the mini world end to end: model, erasure, attack, IRECE, server")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--concept", default="star")
    p.set_defaults(func=cmd_demo)

    for extra in ("export", "server", "benchmarks"):  # verbs contributed by the other packages, when present
        try:
            mod = __import__(f"{extra}.cli", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name not in (extra, f"{extra}.cli"):
                raise
            continue
        mod.register(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"irece: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
