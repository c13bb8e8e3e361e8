"""`irece world render | judge | train | head`: the mini world's verbs (`world check` comes from benchmarks/)."""
from __future__ import annotations

from pathlib import Path

from irece_cli.output import emit, load_png, save_png

from .assets import JUDGE_PATH, MODEL_DIR


def cmd_render(a):
    from . import shapes
    scene = shapes.render(a.concept, seed=a.seed) if a.concept != "pair" else shapes.render_pair(seed=a.seed)
    out = Path(a.out)
    save_png(scene.image, out)
    mask_path = out.with_name(out.stem + ".mask.png")
    save_png((scene.mask * 255).astype("uint8"), mask_path)
    emit({"image": str(out), "mask": str(mask_path), "label": scene.label, "prompt": scene.prompt()}, a.json)


def cmd_judge(a):
    import numpy as np
    from .judge import classify, load_judge
    judge = load_judge(a.judge) if a.judge else load_judge()
    images = np.stack([load_png(f) for f in a.files])
    labels, p = classify(judge, images)
    emit({"results": [{"file": f, "label": lab, "p": float(q)} for f, lab, q in zip(a.files, labels, p)]}, a.json)


def cmd_train(a):
    from .train import train_world
    out = Path(a.out) if a.out else MODEL_DIR
    judge = Path(a.judge_out) if a.judge_out else JUDGE_PATH
    work = Path(a.work) if a.work else Path(".cache") / ("world_quick" if a.quick else "world_train")
    emit(train_world(out, judge, work, quick=a.quick, seed=a.seed, unet_steps=a.unet_steps,
                     ground_steps=a.ground_steps), a.json)


def cmd_head(a):
    from .head import train_head
    from irece_runtime.irece import parse_t_star
    given = {"epochs": a.epochs} if a.epochs else {}
    if a.n:
        given["n"] = a.n
    if a.context is not None:
        given["context"] = a.context
    if a.fit_at:
        given["fit_at"] = tuple(float(parse_t_star(v)) for v in a.fit_at.split(","))
    emit(train_head(a.model or MODEL_DIR, out=a.out, cache=None if a.no_cache else a.cache, **given), a.json)


def cmd_images(a):
    """Scenes with their masks in `irece head train --images`'s layout: a stand-in for an operator's labelled photos."""
    from irece_runtime.head_training import MASKS
    from .head import HEAD_SEED, scenes
    out = Path(a.out)
    (out / MASKS).mkdir(parents=True, exist_ok=True)
    for k, sc in enumerate(scenes(a.n, HEAD_SEED + a.seed)):
        save_png(sc.image, out / f"scene{k:05d}.png")
        for concept, mask in sc.masks.items():
            save_png((mask * 255).astype("uint8"), out / MASKS / f"scene{k:05d}.{concept}.png")
    emit({"folder": str(out), "pictures": a.n}, a.json)


def register_world(world) -> None:
    """Adds render, judge and train to the `irece world` group."""
    p = world.add_parser("render", help="render one scene (and its mask beside it)")
    p.add_argument("--concept", required=True, help="a Shapes-10 concept, 'none' or 'pair'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_render)
    p = world.add_parser("images", help="rendered scenes and their masks as an operator's labelled pictures "
                                        "(irece head train --images)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="offset to the concept head's training seeds")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_images)
    p = world.add_parser("judge", help="classify PNG files with the judge")
    p.add_argument("files", nargs="+")
    p.add_argument("--judge", help="judge weights (default: the committed judge)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_judge)
    p = world.add_parser("train", help="train the Shapes-10 model and judge from scratch")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (smoke run)")
    p.add_argument("--out", help="model folder (default: the committed miniworld/models/shapes10)")
    p.add_argument("--judge-out")
    p.add_argument("--work", help="cache folder for resumable stages (default .cache/world_train)")
    p.add_argument("--unet-steps", type=int, help="UNet steps (a larger value than a finished run's continues it)")
    p.add_argument("--ground-steps", type=int, help="steps of the optional attention-grounding stage (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)
    p = world.add_parser("head", help="train the model's concept head (the head gate) on rendered scenes")
    p.add_argument("--model", help="model folder (default: the committed one); the head goes to its concept_head/")
    p.add_argument("--out", help="write the head under this folder instead")
    p.add_argument("--n", type=int, default=None, help="scenes, each seen inverted and generated, at 3 t "
                                                        "(default: miniworld.head.N_SCENES, 3,072)")
    p.add_argument("--epochs", type=int, help="default: miniworld.head.EPOCHS (300)")
    p.add_argument("--fit-at", help="schedule points to fit on, among the collected 0.3,0.5,0.7 (default: "
                                    "miniworld.head.FIT_AT, 0.5)")
    p.add_argument("--context", type=int, help="3x3 layers between the head's two 1x1 convolutions (default: "
                                                "miniworld.head.CONTEXT)")
    p.add_argument("--cache", default=".cache/head", help="collected features are kept here and reused")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_head)
