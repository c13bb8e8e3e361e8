"""What every verb prints: one JSON object (`--json`) or `key: value` lines; and PNG files in and out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def emit(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj))
    else:
        for k, v in obj.items():
            print(f"{k}: {v}")


def save_png(array: np.ndarray, path: str | Path) -> None:
    from PIL import Image
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def load_png(path: str | Path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))
