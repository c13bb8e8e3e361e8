import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
ROOT = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("IRECE_TEST_MODEL", ROOT / "models" / "shapes10"))
JUDGE = ROOT / "models" / "judge" / "judge.safetensors"


@pytest.fixture(scope="session")
def pipe():
    from irece_runtime.loading import load_pipeline
    return load_pipeline(MODEL)


@pytest.fixture(scope="session")
def judge():
    from irece_runtime.world.judge import load_judge
    return load_judge(JUDGE)
