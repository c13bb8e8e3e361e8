"""Shapes-10: the mini world's concepts, rendered with ground-truth masks.

Ten shapes a 32x32 image can tell apart (each name is one CLIP BPE token), drawn in a colour on a
plain background at a random position and size. Every render returns (image, mask, label) so the
localizer can be scored against the truth. Shapes are drawn at 4x and box-filtered down, so edges
are anti-aliased like a real photo's; the mask is the 4x coverage thresholded at one half.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from irece_runtime.images import PERTURBATIONS, perturb  # noqa: F401 (photo perturbations: the runtime's, any model)

CONCEPTS = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring", "moon", "arrow")
NO_SHAPE = "none"  # the judge's 11th class: a background with nothing on it
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (240, 220, 50),
           "orange": (245, 140, 30), "purple": (150, 60, 200), "white": (245, 245, 245), "pink": (245, 130, 190)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "brown": (110, 70, 40), "white": (240, 240, 240)}
SIZE = 32
_SS = 4  # supersampling factor


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def legible(colour: str, background: str) -> bool:
    """A colour/background pair the eye (and the judge) can separate."""
    c, b = COLOURS[colour], BACKGROUNDS[background]
    return colour != background and (abs(_luma(c) - _luma(b)) > 40 or max(abs(x - y) for x, y in zip(c, b)) > 120)


def _polygon(cx, cy, r, pts):
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _star(n=5, inner=0.45):
    return [((1 if k % 2 == 0 else inner) * math.sin(math.pi * k / n),
             -(1 if k % 2 == 0 else inner) * math.cos(math.pi * k / n)) for k in range(2 * n)]


def _heart():
    ts = np.linspace(0, 2 * math.pi, 60, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    return list(zip(x / 17.0, (y + 2.5) / 17.0))


_SHAPES = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0, -1), (0.95, 0.75), (-0.95, 0.75)],
    "star": _star(),
    "heart": _heart(),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "diamond": [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)],
    "arrow": [(-1, -0.25), (0.1, -0.25), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.25), (-1, 0.25)],
}


def _draw(draw: ImageDraw.ImageDraw, concept: str, cx: float, cy: float, r: float) -> None:
    if concept == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif concept == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif concept == "moon":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.45 * r, cy - 1.05 * r, cx + 1.35 * r, cy + 0.75 * r], fill=0)
    else:
        draw.polygon(_polygon(cx, cy, r, _SHAPES[concept]), fill=255)


def coverage(concept: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Fraction of each pixel the shape covers, in [0, 1], shape (SIZE, SIZE)."""
    hi = Image.new("L", (SIZE * _SS, SIZE * _SS), 0)
    _draw(ImageDraw.Draw(hi), concept, cx * _SS, cy * _SS, r * _SS)
    a = np.asarray(hi, dtype=np.float32).reshape(SIZE, _SS, SIZE, _SS) / 255.0
    return a.mean(axis=(1, 3))


@dataclass
class Shape:
    concept: str
    colour: str
    cx: float
    cy: float
    r: float


@dataclass
class Scene:
    image: np.ndarray  # uint8 HxWx3
    mask: np.ndarray  # bool HxW, union of all shapes
    masks: dict  # concept -> bool HxW
    shapes: list
    background: str
    perturbation: str | None = None  # what the image went through after rendering (perturb), if anything

    @property
    def label(self) -> str:
        return self.shapes[0].concept if self.shapes else NO_SHAPE

    def prompt(self, template: str = "a {colour} {concept} on a {background} background",
               order: list[int] | None = None, colours: bool = True, background: bool = True) -> str:
        """The caption: one shape through `template`; several as "a red star and a blue heart [and ...] on a
        white background", in `order` (default: as drawn), with or without colours and background."""
        if len(self.shapes) == 1 and order is None:
            s = self.shapes[0]
            return template.format(colour=s.colour, concept=s.concept, background=self.background)
        order = list(range(len(self.shapes))) if order is None else order
        named = " and ".join(f"a {self.shapes[k].colour} {self.shapes[k].concept}" if colours
                             else f"a {self.shapes[k].concept}" for k in order)
        return f"{named} on a {self.background} background" if background else named


def compose(shapes: list[Shape], background: str, rng: np.random.Generator | None = None,
            noise: float = 0.0) -> Scene:
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[background]
    masks = {}
    for s in shapes:
        cov = coverage(s.concept, s.cx, s.cy, s.r)[..., None]
        img = img * (1 - cov) + np.asarray(COLOURS[s.colour], np.float32) * cov
        masks[s.concept] = cov[..., 0] >= 0.5
    if noise and rng is not None:
        img = img + rng.normal(0, noise, img.shape)
    union = np.zeros((SIZE, SIZE), bool)
    for m in masks.values():
        union |= m
    return Scene(np.clip(img, 0, 255).round().astype(np.uint8), union, masks, shapes, background)


def _pick_colour(rng, background, exclude=()):
    choices = [c for c in COLOURS if legible(c, background) and c not in exclude]
    return choices[rng.integers(len(choices))]


def render(concept: str | None = None, seed: int | None = None, rng: np.random.Generator | None = None,
           colour: str | None = None, background: str | None = None) -> Scene:
    """One shape (a random concept if None) at a random place and size, or an empty scene for NO_SHAPE."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    concept = concept or CONCEPTS[rng.integers(len(CONCEPTS))]
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if concept == NO_SHAPE:
        return compose([], background)
    colour = colour or _pick_colour(rng, background)
    r = rng.uniform(6.0, 11.0)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
    return compose([Shape(concept, colour, cx, cy, r)], background)


def render_scene(concepts: tuple[str, ...] | int | None = None, seed: int | None = None,
                 rng: np.random.Generator | None = None, background: str | None = None) -> Scene:
    """Two or three different shapes (or the named concepts) in distinct colours, placed without overlap.
    concepts: the shapes to draw, or how many random ones (default 2)."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    if concepts is None or isinstance(concepts, int):
        k = concepts or 2
        concepts = tuple(CONCEPTS[i] for i in rng.choice(len(CONCEPTS), k, replace=False))
    if len(set(concepts)) != len(concepts) or not 1 <= len(concepts) <= 3:
        raise ValueError(f"a scene holds one to three different shapes, got {concepts}")
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    lo, hi = {1: (6.0, 11.0), 2: (4.5, 7.0), 3: (4.0, 5.5)}[len(concepts)]
    while True:  # rejection sampling: discs around the shapes (plus a pixel) must not touch
        r = rng.uniform(lo, hi, size=len(concepts))
        c = np.stack([rng.uniform(k + 1, SIZE - k - 1, size=2) for k in r])
        if all(np.hypot(*(c[i] - c[j])) > r[i] + r[j] + 1 for i in range(len(r)) for j in range(i)):
            break
    colours: list[str] = []
    for _ in concepts:
        colours.append(_pick_colour(rng, background, exclude=tuple(colours)))
    return compose([Shape(n, col, x, y, rad) for n, col, (x, y), rad in zip(concepts, colours, c, r)], background)


def render_pair(concepts: tuple[str, str] | None = None, seed: int | None = None,
                rng: np.random.Generator | None = None) -> Scene:
    """Two different shapes side by side (left/right or top/bottom), not overlapping."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    if concepts is None:
        i, j = rng.choice(len(CONCEPTS), 2, replace=False)
        concepts = (CONCEPTS[i], CONCEPTS[j])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    c1 = _pick_colour(rng, background)
    c2 = _pick_colour(rng, background, exclude=(c1,))
    r = rng.uniform(5.0, 7.0, size=2)
    horizontal = rng.random() < 0.5
    along = [rng.uniform(r[0] + 0.5, 15.5 - r[0]), rng.uniform(16.5 + r[1], 31.5 - r[1])]
    across = [rng.uniform(k + 1, SIZE - k - 1) for k in r]
    pos = [(along[k], across[k]) if horizontal else (across[k], along[k]) for k in range(2)]
    shapes = [Shape(concepts[k], (c1, c2)[k], pos[k][0], pos[k][1], r[k]) for k in range(2)]
    return compose(shapes, background)


TEXT_TEMPLATES = (
    "a {colour} {concept} on a {background} background",
    "an image of a {concept}",
    "a photo of a {concept}",
    "a {colour} {concept}",
    "a {concept} on a {background} background",
    "a {concept}",
)


def random_prompt(scene: Scene, rng: np.random.Generator) -> str:
    """The training caption of a scene. One shape: a template chosen at random, so every prompt form is
    learned. Several: every shape named, in a random order (so no word position stands for a place), usually
    with colours and background, sometimes without (so "a star and a heart" binds each word to its shape)."""
    if len(scene.shapes) == 1:
        return scene.prompt(TEXT_TEMPLATES[rng.integers(len(TEXT_TEMPLATES))])
    if not scene.shapes:
        return f"a plain {scene.background} background"
    order = list(rng.permutation(len(scene.shapes)))
    u = rng.random()
    return scene.prompt(order=order, colours=u < 0.75, background=u < 0.6 or u >= 0.85)

