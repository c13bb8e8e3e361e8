"""IRECE as pure functions: aggregate cross-attention maps -> mask -> perturb the latent.

    maps (per layer)  --aggregate_maps-->  concept map (latent resolution)
    concept map       --concept_mask--->   M = [minmax(map) >= tau]
    x_t, M, xi        --perturb-------->   x*_t = (1 - M) * x_t + M * xi      ("replace", the paper's rule)
                                           x*_t = x_t + M * xi                ("add")

No I/O and no model here: the localizer (standard UNet + attention processors) produces the layer maps,
the denoising loop calls these at step t*.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

PERTURB_MODES = ("replace", "add")


@dataclass(frozen=True)
class IreceConfig:
    concepts: tuple[str, ...] = ()
    tau: float = 0.4  # the paper's localization threshold
    t_star: float | int = 0.3  # a fraction of the schedule (float) or a step index (int)
    mode: str = "replace"
    template: str = "a photo of a {concept}"  # the localization prompt c_tgt
    min_peak: float = 0.0  # presence gate on the raw map's peak; 0 = always intervene (the paper)
    per_concept: dict = field(default_factory=dict)  # concept -> {"tau": .., "t_star": ..} (`irece bench tune`)

    def __post_init__(self):
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if self.mode not in PERTURB_MODES:
            raise ValueError(f"mode must be one of {PERTURB_MODES}, got {self.mode!r}")
        if isinstance(self.t_star, float) and not 0.0 <= self.t_star < 1.0:
            raise ValueError(f"t_star as a fraction must be in [0, 1), got {self.t_star}")

    def step_index(self, num_steps: int) -> int:
        """t* as an index into a schedule of num_steps denoising steps."""
        if isinstance(self.t_star, int) and not isinstance(self.t_star, bool):
            if not 0 <= self.t_star < num_steps:
                raise ValueError(f"t_star index {self.t_star} outside 0..{num_steps - 1}")
            return self.t_star
        return min(num_steps - 1, int(round(self.t_star * num_steps)))

    def plan(self, num_steps: int) -> dict[int, list[tuple[str, float]]]:
        """step index -> [(concept, tau)]: where each concept is localized, with its own settings if tuned."""
        out: dict[int, list[tuple[str, float]]] = {}
        for c in self.concepts:
            o = self.per_concept.get(c, {})
            step = replace(self, t_star=o.get("t_star", self.t_star), per_concept={}).step_index(num_steps)
            out.setdefault(step, []).append((c, float(o.get("tau", self.tau))))
        return out


def aggregate_maps(layer_maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Per-layer concept maps (B, h_l*w_l), already head-averaged and token-weighted -> (B, H, W).

    Each layer's map is reshaped to its own grid (same aspect as the latent), bilinearly upsampled to the
    latent grid (H, W), and the layers are averaged with equal weight.
    """
    if not layer_maps:
        raise ValueError("no cross-attention maps were recorded")
    H, W = int(size[0]), int(size[1])  # static under tracing; the batch stays dynamic
    out = 0.0
    for m in layer_maps:
        scale = int(round((H * W / int(m.shape[1])) ** 0.5))
        grid = m.reshape(-1, 1, H // scale, W // scale)
        out = out + F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)
    return (out / len(layer_maps))[:, 0]


def minmax(concept_map: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalize each map of (B, H, W) to [0, 1]."""
    flat = concept_map.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    return ((flat - lo[:, None]) / (hi - lo + eps)[:, None]).view_as(concept_map)


def concept_mask(concept_map: torch.Tensor, tau: float, min_peak: float = 0.0) -> torch.Tensor:
    """(B, H, W) raw concept map -> binary float mask M: minmax(map) >= tau, empty where the peak < min_peak."""
    m = (minmax(concept_map) >= tau).to(concept_map.dtype)
    present = concept_map.flatten(1).max(1).values >= min_peak
    return m * present[:, None, None].to(m.dtype)


def perturb(x: torch.Tensor, mask: torch.Tensor, xi: torch.Tensor, mode: str = "replace") -> torch.Tensor:
    """x: (B, C, H, W) latent, mask: (B, H, W) in {0, 1}, xi ~ N(0, I) like x."""
    m = mask[:, None].to(x.dtype)
    if mode == "replace":
        return torch.where(m > 0, xi, x)  # == (1 - M) * x + M * xi for binary M, and exactly x where M = 0
    if mode == "add":
        return x + m * xi
    raise ValueError(f"unknown perturbation mode {mode!r}")


def token_weights(prompt_ids: list[int], concept_ids: list[int], length: int = 77) -> torch.Tensor:
    """A (length,) weight vector that averages over the concept's tokens inside the prompt's token ids.

    prompt_ids include BOS; concept_ids are the concept word's BPE tokens (no BOS/EOS). Every occurrence
    counts. Raises if the concept does not occur in the prompt.
    """
    n = len(concept_ids)
    w = torch.zeros(length)
    for i in range(len(prompt_ids) - n + 1):
        if prompt_ids[i:i + n] == concept_ids:
            w[i:i + n] = 1.0
    if w.sum() == 0:
        raise ValueError(f"concept tokens {concept_ids} not found in localization prompt tokens {prompt_ids}")
    return w / w.sum()


@dataclass
class ConceptReport:
    concept: str
    mask_area: float  # fraction of latent cells in the mask
    peak: float  # the raw map's maximum (attention probability mass)
    intervened: bool


@dataclass
class IreceReport:
    step_index: int = -1
    timestep: int = -1
    concepts: list[ConceptReport] = field(default_factory=list)
    mask: torch.Tensor | None = None  # (B, H, W) union mask

    @property
    def intervened(self) -> bool:
        return any(c.intervened for c in self.concepts)

    @property
    def mask_area(self) -> float:
        return float(self.mask.mean()) if self.mask is not None else 0.0

    def to_dict(self) -> dict:
        return {"intervened": self.intervened, "mask_area": self.mask_area, "step_index": self.step_index,
                "timestep": self.timestep,
                "concepts": [{"concept": c.concept, "mask_area": c.mask_area, "peak": c.peak,
                              "intervened": c.intervened} for c in self.concepts]}
