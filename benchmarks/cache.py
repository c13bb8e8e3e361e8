"""Content-hash cache for benchmark artifacts (erased UNets, embeddings, adversarial prompts, inverted latents)."""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path



CACHE_DIR = Path(".cache") / "bench"  # relative to where the benchmark runs


@lru_cache(maxsize=None)
def model_fingerprint(model_dir: str) -> str:
    """Hash of a model folder's weights (file names and contents), or of one weights file."""
    h = hashlib.sha256()
    path = Path(model_dir)
    for f in [path] if path.is_file() else sorted(path.rglob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def key(kind: str, **spec) -> Path:
    """A cache path for an artifact of `kind` made from `spec` (which must name its inputs' fingerprints)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = CACHE_DIR / kind / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
