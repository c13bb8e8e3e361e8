"""Content-hash cache for benchmark artifacts (erased UNets, embeddings, adversarial prompts, inverted latents)."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from irece_runtime.concept_head import HEAD_DIR

CACHE_DIR = Path(".cache") / "bench"  # relative to where the benchmark runs


@lru_cache(maxsize=None)
def model_fingerprint(model_dir: str, head: bool = True) -> str:
    """Hash of a model folder's weights (file names and contents), or of one weights file. head=False leaves the
    concept head out: for what the diffusion model alone makes (erasures, TI embeddings, inversions), which a new
    head must not send to be made again (UCE on ten concepts: 28 min)."""
    h = hashlib.sha256()
    path = Path(model_dir)
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    for f in files if head or path.is_file() else [f for f in files if HEAD_DIR not in f.relative_to(path).parts]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def key(kind: str, **spec) -> Path:
    """A cache path for an artifact of `kind` made from `spec` (which must name its inputs' fingerprints)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = CACHE_DIR / kind / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: Path):
    """A temporary name beside `path` to write to; renamed to `path` once written, so that a reader (another cell
    running at once, `irece bench crr --ray`) sees the whole artifact or none of it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
