"""Engine calls as values: what a request's state machine asks of a backend, and how such calls run alone or merged.

A request is a generator (`Pipeline.machine`) that yields `Call`s and receives each call's result. `drive` runs one
machine alone, each call as it comes (the CLI, benchmarks, the unbatched server). `run_merged` runs the calls of
several machines that share a `Call.key` as one batched backend call and splits the result back, row for row
(the batched server's scheduler, `server/scheduler.py`). Calls merge only when every input but the batch axis has
the same shape (same latent size, same number of concept token sets); the timestep becomes a per-sample vector, so
requests at different steps share a UNet call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

import torch

from .backends import Backend, check_model

KINDS = ("encode_text", "vae_encode", "vae_decode", "eps", "concept_map", "concept_head")
# a request's state machine: yields calls, receives their results, returns its value (the Result)
Machine = Generator["Call", Any, Any]


@dataclass
class Call:
    kind: str  # one of KINDS: the backend method it stands for
    inputs: tuple[torch.Tensor, ...]  # batch-first tensors, in the backend method's order (timestep apart)
    timestep: torch.Tensor | None = None  # eps / concept_map / concept_head: a scalar (all rows) or one per row
    model: str | None = None  # eps: "erased" or "standard"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"call kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "eps":
            check_model(self.model)

    @property
    def rows(self) -> int:
        return int(self.inputs[0].shape[0])

    def key(self) -> tuple:
        """Calls with equal keys can run as one backend call."""
        return self.kind, self.model, tuple((tuple(t.shape[1:]), t.dtype) for t in self.inputs)

    def run(self, backend: Backend):
        """This call alone: exactly the backend call the loop made before calls were values."""
        return _invoke(backend, self.kind, self.model, self.inputs, self.timestep)


def row_limit(kind: str, max_batch: int) -> int:
    """Rows one merged call may carry for max_batch images: a UNet call carries both guidance branches of each image,
    so twice as many (TensorRT's engines are built to the same limits, `export/tensorrt_build.py`)."""
    return max_batch * (2 if kind == "eps" else 1)


def _invoke(backend: Backend, kind: str, model, inputs, timestep):
    if kind == "encode_text":
        return backend.encode_text(*inputs)
    if kind == "vae_encode":
        return backend.vae_encode(*inputs)
    if kind == "vae_decode":
        return backend.vae_decode(*inputs)
    if kind == "eps":
        x, hidden = inputs
        return backend.eps(model, x, timestep, hidden)
    if kind == "concept_map":
        x, hidden, weights = inputs
        return backend.concept_map(x, timestep, hidden, weights)
    x, hidden = inputs  # concept_head
    return backend.concept_head(x, timestep, hidden)


def drive(machine: Machine, backend: Backend):
    """Run one request's machine alone, every call as it comes; returns what the machine returns."""
    try:
        call = next(machine)
        while True:
            call = machine.send(call.run(backend))
    except StopIteration as stop:
        return stop.value


def per_row_timesteps(calls: list[Call]) -> torch.Tensor:
    """One timestep per row of the merged call: each call's own (scalar or per-row) timestep."""
    out = []
    for c in calls:
        t = torch.as_tensor(c.timestep)
        out.append(t.reshape(1).expand(c.rows) if t.numel() == 1 else t.reshape(c.rows))
    return torch.cat(out)


def run_merged(backend: Backend, calls: list[Call]) -> list:
    """Calls with one key as one backend call (rows concatenated in order, timesteps per row); each call's share of
    the result. A single call runs exactly as alone."""
    if len(calls) == 1:
        return [calls[0].run(backend)]
    first = calls[0]
    inputs = tuple(torch.cat([c.inputs[i] for c in calls]) for i in range(len(first.inputs)))
    timestep = per_row_timesteps(calls) if first.timestep is not None else None
    out = _invoke(backend, first.kind, first.model, inputs, timestep)
    sizes = [c.rows for c in calls]
    if isinstance(out, tuple):
        parts = [o.split(sizes) for o in out]
        return [tuple(p[i] for p in parts) for i in range(len(calls))]
    return list(out.split(sizes))
