"""`irece erase`: erase a concept from a model folder's UNet."""
from __future__ import annotations

import json
from pathlib import Path

from irece_cli.output import emit

from .methods import METHODS, erase, generic_prompts


def prompt_set(name: str, model_dir: str):
    """"generic" phrasings for any model; "shapes10" the mini world's (colours, backgrounds); "auto" picks
    shapes10 when the model folder's concepts.json is the Shapes-10 vocabulary."""
    if name == "auto":
        vocab = Path(model_dir) / "concepts.json"
        from miniworld.shapes import CONCEPTS
        name = "shapes10" if vocab.exists() and tuple(json.loads(vocab.read_text())) == CONCEPTS else "generic"
    if name == "shapes10":
        from miniworld.prompts import erase_prompts
        return erase_prompts
    return generic_prompts


def cmd_erase(a):
    emit(erase(a.method, a.model, a.concept, a.out, preserve=a.preserve, steps=a.steps, seed=a.seed,
               prompts=prompt_set(a.prompts, a.model)), a.json)


def register(sub, default_model: str) -> None:
    p = sub.add_parser("erase", help="erase a concept from a model's UNet")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--concept", required=True)
    p.add_argument("--model", default=default_model)
    p.add_argument("--out", required=True, help="output UNet folder (diffusers layout)")
    p.add_argument("--preserve", action="append",
                   help="concepts to preserve (UCE; default: the other concepts of the folder's concepts.json)")
    p.add_argument("--prompts", choices=("auto", "generic", "shapes10"), default="auto",
                   help="phrasings to erase on (auto: shapes10 for the mini world, generic otherwise)")
    p.add_argument("--steps", type=int, help="training iterations (ESD/Receler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_erase)
