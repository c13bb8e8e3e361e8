"""Where the committed mini-world weights live: inside this package, so a non-editable install carries them."""
from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).resolve().parent / "models"
MODEL_DIR = MODELS / "shapes10"  # a diffusers StableDiffusionPipeline folder
JUDGE_PATH = MODELS / "judge" / "judge.safetensors"
TOKENIZER_DIR = MODEL_DIR / "tokenizer"  # CLIP's BPE, as converted by scripts/make_clip_tokenizer.py
