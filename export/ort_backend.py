"""ONNX Runtime backend: the Engines interface over the exported ONNX graphs.

CPU execution provider everywhere; CUDA (and TensorRT) providers are used when onnxruntime-gpu offers them.
Inputs and outputs go through IO binding, so on CUDA the tensors stay on the device between calls.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .manifest import read_manifest


def default_providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtEngines:
    def __init__(self, engine_dir: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort
        self.dir = Path(engine_dir)
        self.manifest = m = read_manifest(engine_dir)
        cfg = m["config"]
        self.embed_dim, self.latent_channels = cfg["embed_dim"], cfg["latent_channels"]
        self.vae_scale_factor, self.scaling_factor = cfg["vae_scale_factor"], cfg["scaling_factor"]
        self.providers = providers or default_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {}
        for name, comp in m["components"].items():
            f = comp["file"]
            if f not in self.sessions:
                self.sessions[f] = ort.InferenceSession(str(self.dir / f), opts, providers=self.providers)
        self.files = {name: comp["file"] for name, comp in m["components"].items()}
        self.token_embedding = load_file(str(self.dir / "token_embedding.safetensors"))["weight"]

    def _run(self, component: str, **inputs: torch.Tensor) -> torch.Tensor:
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
        out_name = sess.get_outputs()[0].name
        binding.bind_output(out_name, self.device)
        sess.run_with_iobinding(binding)
        out = binding.get_outputs()[0]
        if self.device == "cuda":
            return torch.from_dlpack(out.to_dlpack()) if hasattr(out, "to_dlpack") else torch.from_numpy(out.numpy())
        return torch.from_numpy(out.numpy())

    def embed_tokens(self, input_ids):
        return self.token_embedding[input_ids.cpu()]

    def encode_text(self, token_embeds):
        return self._run("text_encoder", token_embeds=token_embeds)

    def eps(self, model, sample, timestep, hidden):
        if model not in ("erased", "standard"):
            raise ValueError(f"model must be 'erased' or 'standard', got {model!r}")
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(1)
        return self._run(f"unet_{model}", sample=sample, timestep=t, encoder_hidden_states=hidden)

    def concept_map(self, sample, timestep, hidden, token_weights):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(1)
        return self._run("localizer", sample=sample, timestep=t, encoder_hidden_states=hidden,
                         token_weights=token_weights)

    def vae_encode(self, images):
        return self._run("vae_encoder", images=images)

    def vae_decode(self, latents):
        return self._run("vae_decoder", latents=latents)
