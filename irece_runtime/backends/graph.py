"""Exported-graph folders (`irece export`): the manifest, and the backend interface mapped onto named graphs,
shared by the ONNX Runtime and TensorRT backends."""
from __future__ import annotations

import json
from pathlib import Path

from . import BackendLimits, check_model

MANIFEST = "manifest.json"
FORMAT = "irece-engines/4"  # 2: the localizer graph ends with the presence gate; 3: one timestep per sample (B,);
# 4: the localizer graph gives the concept maps only (the contrastive gate left the product)


class GraphMismatch(RuntimeError):
    """The graph folder was built for another runtime version, GPU or format."""


def read_manifest(graphs_dir: str | Path) -> dict:
    path = Path(graphs_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{graphs_dir}: no {MANIFEST}; build it with `irece export`")
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise GraphMismatch(f"{path}: graph-folder format {m.get('format')!r}, this runtime reads {FORMAT!r}; "
                            f"export it again with `irece export`")
    return m


class GraphBackend:
    """The backend interface over exported graphs named as in the manifest: subclasses provide `_run(component,
    **inputs)` (one graph call) and the token-embedding table; the mapping onto the interface lives here."""

    device = "cpu"
    token_embedding = None

    def _configure(self, manifest: dict) -> None:
        cfg = manifest["config"]
        self.embed_dim, self.latent_channels = cfg["embed_dim"], cfg["latent_channels"]
        self.vae_scale_factor, self.scaling_factor = cfg["vae_scale_factor"], cfg["scaling_factor"]
        self.limits = BackendLimits(None, (cfg["latent_h"], cfg["latent_w"]))  # spatial size is static per folder
        self.components = frozenset(manifest["components"])  # the graphs this folder has

    def _run(self, component: str, **inputs):
        raise NotImplementedError

    def embed_tokens(self, input_ids):
        return self.token_embedding[input_ids.to(self.token_embedding.device)]

    def encode_text(self, token_embeds):
        return self._run("text_encoder", token_embeds=token_embeds)

    def eps(self, model, sample, timestep, hidden):
        return self._run(f"unet_{check_model(model)}", sample=sample, timestep=_timestep(timestep, sample.shape[0]),
                         encoder_hidden_states=hidden)

    def concept_map(self, sample, timestep, hidden, token_weights):
        import torch
        single = token_weights.dim() == 2  # the graph takes K token sets: (B, K, 77) -> (B, K, H, W)
        tw = token_weights[:, None] if single else token_weights
        maps = self._run("localizer", sample=sample, timestep=_timestep(timestep, sample.shape[0]),
                         encoder_hidden_states=hidden, token_weights=tw)
        return maps[:, 0] if single else maps

    def concept_head(self, sample, timestep, hidden):
        if "concept_head" not in self.components:
            raise ValueError("this graph folder has no concept_head graph: export a model folder that has a "
                             "concept_head/ (`irece head train`)")
        return self._run("concept_head", sample=sample, timestep=_timestep(timestep, sample.shape[0]),
                         encoder_hidden_states=hidden)

    def vae_encode(self, images):
        return self._run("vae_encoder", images=images)

    def vae_decode(self, latents):
        return self._run("vae_decoder", latents=latents)


def _timestep(t, batch: int):
    """The graphs take one float timestep per sample, (B,): a scalar is repeated, a (B,) vector kept (rows of a
    batched call at different steps)."""
    import torch
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    if t.numel() not in (1, batch):
        raise ValueError(f"timestep must be a scalar or one per sample ({batch}), got {t.numel()}")
    return t.expand(batch)
