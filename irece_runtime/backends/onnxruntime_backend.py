"""ONNX Runtime backend: the backend interface over the exported ONNX graphs.

CPU execution provider everywhere; CUDA (and TensorRT) providers are used when onnxruntime-gpu offers them.
Inputs and outputs go through IO binding, so on CUDA the tensors stay on the device between calls.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .graph import GraphBackend, read_manifest


def default_providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


_SHARED_POOL: bool | None = None


def _shared_thread_pool(threads: int | None) -> bool:
    """One intra-op thread pool for all of the process's sessions. ORT's default gives each session its own pool,
    whose threads spin for a while after a run: the text encoder's and the localizer's pools then spin beside the
    UNet's on the same cores and slow the steps after them (measured: BENCHMARKS.md, peers). Must precede the first
    session of the process; returns False (per-session pools) if another session came first."""
    global _SHARED_POOL
    if _SHARED_POOL is None:
        import onnxruntime as ort
        try:
            ort.set_global_thread_pool_sizes(threads or 0, 1)
            _SHARED_POOL = True
        except Exception:  # an environment already exists without global pools
            _SHARED_POOL = False
    return _SHARED_POOL


class OrtBackend(GraphBackend):
    def __init__(self, graphs_dir: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort
        self.dir = Path(graphs_dir)
        self.manifest = m = read_manifest(graphs_dir)
        self._configure(m)
        self.providers = providers or default_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # once the process has a global pool, ORT refuses per-session pools: every later session joins it
        if (os.environ.get("IRECE_ORT_POOL", "shared") == "shared" or _SHARED_POOL) and _shared_thread_pool(threads):
            opts.use_per_session_threads = False
        elif threads:
            opts.intra_op_num_threads = threads
        self.sessions = {}
        for name, comp in m["components"].items():
            f = comp["file"]
            if f not in self.sessions:
                self.sessions[f] = ort.InferenceSession(str(self.dir / f), opts, providers=self.providers)
        self.files = {name: comp["file"] for name, comp in m["components"].items()}
        self.token_embedding = load_file(str(self.dir / "token_embedding.safetensors"))["weight"]

    def _run(self, component: str, **inputs: torch.Tensor):
        """One graph call: its output tensor, or a tuple of them for a graph with several (the localizer)."""
        sess = self.sessions[self.files[component]]
        binding = sess.io_binding()
        keep = []
        for name, t in inputs.items():
            t = t.detach().to(torch.float32).contiguous()
            if self.device == "cuda":
                t = t.cuda()
                binding.bind_input(name, "cuda", 0, np.float32, tuple(t.shape), t.data_ptr())
            else:
                binding.bind_cpu_input(name, t.numpy())
            keep.append(t)
        for o in sess.get_outputs():
            binding.bind_output(o.name, self.device)
        sess.run_with_iobinding(binding)
        outs = [self._to_torch(o) for o in binding.get_outputs()]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _to_torch(self, out) -> torch.Tensor:
        if self.device == "cuda":
            return torch.from_dlpack(out.to_dlpack()) if hasattr(out, "to_dlpack") else torch.from_numpy(out.numpy())
        return torch.from_numpy(out.numpy())
