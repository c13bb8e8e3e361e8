import os
from pathlib import Path

import pytest
import torch

from miniworld.assets import JUDGE_PATH, MODEL_DIR

torch.set_num_threads(min(2, os.cpu_count() or 1))
MODEL = Path(os.environ.get("IRECE_TEST_MODEL", MODEL_DIR))
JUDGE = JUDGE_PATH


@pytest.fixture(scope="session")
def pipe():
    from irece_runtime.loading import load_pipeline
    return load_pipeline(MODEL)


@pytest.fixture(scope="session")
def judge():
    from miniworld.judge import load_judge
    return load_judge(JUDGE)
