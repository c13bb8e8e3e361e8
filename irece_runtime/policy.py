"""Named defence policies: the one switch an operator turns on.

A policy is data (diffusers' SafetyConfig presets, vLLM's model-folder defaults): a name, the IreceConfig fields it
sets, and which of those depend on the model and so come from the calibration block stored beside the model's concept
head (`<model>/concept_head/config.json`, written by `irece calibrate`). Fields an operator gives explicitly override
the policy; a policy that needs a calibration the model does not have (or one made for another head) is refused with
the command that makes it.

    paper   the seed paper's IRECE: at t* = 0.3 the concept's cross-attention mask (min-max >= tau 0.4) is re-noised
            in every request, whether the concept is there or not
    gated   re-noise only where the model's concept head sees the concept, and make the re-noising stick: the head's
            own cells grown by one, looked at again later in the schedule (the calibrated rechecks, each with its own
            threshold), the region steered away from the concept (the direction computed every third step), a
            learned embedding that drew it (or that the diffusion classifier's reader finds carrying it) re-noised
            whole and dropped, and on inverted images everything outside the mask (and the other concepts' pixels
            inside it) kept as the input had it
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

from .concept_head import DEFAULT_TAU, HEAD_CONFIG, HEAD_DIR, HEAD_FILE
from .irece import IreceConfig

CALIBRATION = "calibration"  # the block's key in the head's config.json
CALIBRATE_COMMAND = "irece calibrate --model {model}"


@dataclass(frozen=True)
class Policy:
    name: str
    summary: str
    settings: dict  # IreceConfig fields the policy sets
    calibrated: tuple[str, ...] = ()  # IreceConfig fields read from the model's calibration block


POLICIES = {p.name: p for p in (
    Policy("paper", "the seed paper's IRECE: always re-noise the concept's attention mask at t* (tau 0.4)",
           {"gate": "off"}),
    Policy("gated", "re-noise only where the concept head sees the concept; rechecks, negative guidance, dropped "
                    "conditioning, and on inverted images the rest of the image kept",
           {"gate": "head", "grow": 1, "negative_guidance": 3.0, "conditioning": "null", "keep_outside": True,
            "keep_others": True,
            # the reader of a learned embedding's conditioning at one t' (300) instead of three (100, 300, 500): as
            # many textual inversions caught and benign embeddings kept on UCE's ten concepts (bench policy,
            # BENCHMARKS.md), at a third of the reader's UNet rows
            "classifier_timesteps": (300,),
            # the steering direction computed every third step and reused between (afresh at each re-noising): on
            # re-noised text requests 1.31x IRECE off instead of 1.58x, UCE's inversions 5.9% against 5.2% (same
            # seeds, noise-level; BENCHMARKS.md)
            "negative_guidance_every": 3},
           # the looks (t* and the rechecks) and each one's threshold: where the head's scores were calibrated
           ("t_star", "tau", "threshold", "recheck", "recheck_threshold")),
)}
PAPER, RECOMMENDED = "paper", "gated"
IRECE_FIELDS = tuple(f.name for f in fields(IreceConfig) if f.name != "concepts")


def head_digest(model_dir: str | Path) -> str:
    """sha256 of the concept head's weights: a calibration holds for the head it was measured on only."""
    return hashlib.sha256((Path(model_dir) / HEAD_DIR / HEAD_FILE).read_bytes()).hexdigest()


def read_calibration(model_dir: str | Path) -> dict:
    """The model's calibration block, checked against the head it sits beside; a missing head, a missing block or a
    block made for other weights raises ValueError naming the command that makes it."""
    model_dir = Path(model_dir)
    fix = CALIBRATE_COMMAND.format(model=model_dir)
    config = model_dir / HEAD_DIR / HEAD_CONFIG
    if not config.exists():
        raise ValueError(f"{model_dir} has no concept head ({HEAD_DIR}/): train one with `irece head train --model "
                         f"{model_dir} --concepts ...` and calibrate it with `{fix}`")
    block = json.loads(config.read_text()).get(CALIBRATION)
    if not block:
        raise ValueError(f"{config} has no calibration block: run `{fix}`")
    if block.get("head_sha256") != head_digest(model_dir):
        raise ValueError(f"{config}: the calibration was made for other head weights (stale): run `{fix}` again")
    return block


def has_calibration(model_dir: str | Path) -> bool:
    try:
        read_calibration(model_dir)
    except ValueError:
        return False
    return True


def head_tau(model_dir: str | Path, default: float = DEFAULT_TAU) -> float:
    """The cell probability `irece head train` chose for the head's masks (on its own left-out generations), or
    `default` for a head without one (`irece world head`'s)."""
    config = Path(model_dir) / HEAD_DIR / HEAD_CONFIG
    return float(json.loads(config.read_text()).get("tau", default)) if config.exists() else default


def write_calibration(model_dir: str | Path, block: dict) -> Path:
    """Store `block` (the calibrated fields, the split and FPR budget they came from) in the head's config.json,
    stamped with the head's digest."""
    config = Path(model_dir) / HEAD_DIR / HEAD_CONFIG
    head = json.loads(config.read_text())
    head[CALIBRATION] = {**block, "head_sha256": head_digest(model_dir)}
    config.write_text(json.dumps(head, indent=2) + "\n")
    return config


def resolve(name: str | None, model_dir: str | Path, concepts=(), overrides: dict | None = None) -> IreceConfig:
    """The IreceConfig of policy `name` (None: the recommended one) on this model, with `overrides` (fields given
    explicitly: a config file's or a flag's) on top. Calibrated fields the overrides leave open come from the model's
    calibration block."""
    name = RECOMMENDED if name is None else name
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {tuple(POLICIES)}, got {name!r}")
    policy, overrides = POLICIES[name], dict(overrides or {})
    unknown = set(overrides) - set(IRECE_FIELDS)
    if unknown:
        raise ValueError(f"unknown IRECE field(s) {sorted(unknown)}")
    values = dict(policy.settings)
    if "recheck" in overrides and "recheck_threshold" not in overrides:
        overrides["recheck_threshold"] = ()  # other looks than the calibrated ones: t*'s threshold at each
    open_fields = [f for f in policy.calibrated if f not in overrides]
    if open_fields:
        block = read_calibration(model_dir)
        missing = [f for f in open_fields if f not in block]
        if missing:
            raise ValueError(f"{Path(model_dir) / HEAD_DIR / HEAD_CONFIG}: the calibration block has no {missing} "
                             f"(made by an older calibration): run `{CALIBRATE_COMMAND.format(model=model_dir)}` again")
        values.update({f: block[f] for f in open_fields})
    values.update(overrides)
    return IreceConfig(concepts=tuple(concepts), **{k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in values.items()})
