# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OPEN_CLIP_WHEEL := .cache/wheels/open_clip_torch-3.3.0-py3-none-any.whl

.PHONY: setup demo test protos tokenizer train clean peers-env

setup: $(STAMP) protos

# torch is pinned to 2.13.0 in pyproject.toml: on our machines pip takes the CPU build from local disk.
# The ray extra (ray[serve], pinned) is part of the set-up: the Ray Serve and Ray sweep tests run in make test.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,ray,cpu]'
	touch $@

# gRPC stubs are generated at set-up (not committed) from protos/irece/v1/*.proto
protos: $(STAMP)
	$(PY) -m protos.build

# CLIP's real BPE vocabulary, fetched from open_clip's wheel (the tokenizer test compares against it)
$(OPEN_CLIP_WHEEL):
	mkdir -p .cache/wheels
	$(VENV)/bin/pip download -q --no-deps open_clip_torch==3.3.0 -d .cache/wheels

tokenizer: $(STAMP) $(OPEN_CLIP_WHEEL)
	$(PY) scripts/make_clip_tokenizer.py $(OPEN_CLIP_WHEEL) miniworld/models/shapes10/tokenizer

# A second environment for `irece bench peers` (optimum pins an older transformers than ours)
PEERS_STAMP := .venv-peers/.installed
$(PEERS_STAMP): requirements-peers.txt
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install -q --upgrade pip
	.venv-peers/bin/pip install -q torch==2.13.0
	.venv-peers/bin/pip install -q -r requirements-peers.txt
	touch $@

peers-env: $(PEERS_STAMP)

demo: setup
	$(VENV)/bin/irece demo

test: setup $(OPEN_CLIP_WHEEL) $(PEERS_STAMP)
	$(VENV)/bin/pytest -q --durations=10

# Retrain the mini world (Shapes-10 v4: scenes of 1-3 shapes, f=4 VAE, 8x8 latent) from scratch, as measured in
# BENCHMARKS.md: 6,000 UNet steps, then warm restarts to 9,000 and 15,000 (about 4 h on one thread, 1.05 steps/s;
# every stage resumes from .cache/world_train; at 15,000 it passes `irece world check`), then the concept head on the
# trained model (`irece world head`, about 13 min). The committed weights (miniworld/models) are this run's.
train: setup
	$(VENV)/bin/irece world train
	$(VENV)/bin/irece world train --unet-steps 9000
	$(VENV)/bin/irece world train --unet-steps 15000
	$(VENV)/bin/irece world head

clean:
	rm -rf $(VENV) .venv-peers .cache out
