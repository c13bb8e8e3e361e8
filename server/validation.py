"""Wire request -> pipeline Request + IRECE config, or a RequestError naming the offending field.

Everything from the wire is parsed as plain bytes (numpy.frombuffer, PIL); nothing is unpickled.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field as dataclass_field, replace

import grpc
import numpy as np
import torch
from PIL import Image

from irece_runtime.backends import BackendLimits
from irece_runtime.irece import IreceConfig
from irece_runtime.pipeline import Request
from protos.irece.v1 import generation_pb2 as pb

DTYPES = {"float32": np.float32, "float16": np.float16}
MAX_PROMPT_CHARS = 2000
MAX_VECTORS = 16
MAX_EMBEDDINGS = 16  # learned embeddings per request
MAX_SUPPRESS = 16  # suppress_concepts entries per request
ECHO_CHARS = 32  # errors quote at most this much of a client's string
# Range checks on client tensors. Real SD v1.x VAE latents (scaled by 0.18215) lie within about +-5 and CLIP token
# embeddings have L2 norms around 1 (learned textual-inversion vectors a few times that), so both bounds are
# hundreds of times what real inputs use; they stop values like 1e20 whose squares overflow float32 inside the
# UNet's GroupNorm and the text encoder's LayerNorm and turn IRECE's concept map into NaN.
MAX_LATENT_ABS = 1e3
MAX_EMBEDDING_NORM = 1e3


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.code, self.field = code, field


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, field, message)


def clip(value, n: int = ECHO_CHARS) -> str:
    """A client's value as errors may quote it: its repr, cut to n characters (errors travel as gRPC metadata,
    which has a size limit, and must not reflect arbitrary input)."""
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


@dataclass
class Limits:
    embed_dim: int
    latent_channels: int
    vae_scale_factor: int
    default_side: int  # pixels
    default_steps: int
    max_steps: int
    default_guidance: float
    max_side: int
    max_image_bytes: int
    max_image_pixels: int
    cost_budget: float = math.inf  # native-image steps (see `check_cost`)
    max_latent_abs: float = MAX_LATENT_ABS
    max_embedding_norm: float = MAX_EMBEDDING_NORM
    backend: BackendLimits = dataclass_field(default_factory=BackendLimits)  # what the backend can run at all

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels of a request that names none: the size exported graphs were built for, else
        the model's own."""
        fixed = self.backend.latent_size
        if fixed is None:
            return self.default_side, self.default_side
        return fixed[0] * self.vae_scale_factor, fixed[1] * self.vae_scale_factor


def _prompt(text: str, field: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        raise invalid(field, f"longer than {MAX_PROMPT_CHARS} characters")
    if "\x00" in text:
        raise invalid(field, "contains a NUL character")
    return text


def tensor_from_wire(t: pb.Tensor, field: str) -> np.ndarray:
    if t.dtype not in DTYPES:
        raise invalid(f"{field}.dtype", f"must be one of {sorted(DTYPES)}, got {clip(t.dtype)}")
    shape = list(t.shape)
    if not shape or any(d <= 0 for d in shape) or len(shape) > 4:
        raise invalid(f"{field}.shape", f"must be 1 to 4 positive dimensions, got {clip(shape)}")
    dtype = np.dtype(DTYPES[t.dtype]).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(t.data) != expected:
        raise invalid(f"{field}.data", f"has {len(t.data)} bytes, shape {shape} of {t.dtype} needs {expected}")
    arr = np.frombuffer(t.data, dtype=dtype).reshape(shape).astype(np.float32)
    if not np.isfinite(arr).all():
        raise invalid(f"{field}.data", "contains NaN or inf")
    return arr


def _open(data: bytes):
    """PIL's lazy open: reads the header only (format and size), decodes nothing; PNG and JPEG parsers only."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))


def check_image_header(data: bytes, field: str, limits: Limits) -> None:
    """What can be refused without decoding: size in bytes, format, and pixel count from the PNG/JPEG header."""
    if not data:
        raise invalid(field, "is empty")
    if len(data) > limits.max_image_bytes:
        raise invalid(field, f"is {len(data)} bytes, more than the limit of {limits.max_image_bytes}")
    try:
        with _open(data) as img:
            w, h = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise invalid(field, f"has more than {limits.max_image_pixels} pixels") from None
    except Exception as exc:  # PIL raises many types on data it cannot identify
        raise invalid(field, f"must be a PNG or JPEG image ({type(exc).__name__})") from None
    if w * h > limits.max_image_pixels:
        raise invalid(field, f"is {w}x{h}, more than {limits.max_image_pixels} pixels")


def decode_image(data: bytes, field: str, limits: Limits, side: tuple[int, int]) -> np.ndarray:
    """The full decode, resized to side (height, width). The service calls it only once the request holds a
    worker slot (and a decode slot): the header check is what runs before admission."""
    check_image_header(data, field, limits)
    h, w = side
    try:
        with _open(data) as img:
            img.draft("RGB", (w, h))  # JPEG: let the decoder downscale (by up to 8) instead of decoding full size
            img = img.convert("RGB")
    except Exception as exc:  # a valid header over corrupt or truncated data
        raise invalid(field, f"cannot be decoded as an image ({type(exc).__name__})") from None
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    return np.asarray(img)


@dataclass
class PendingImage:
    """An inverted-latent request's image, header-checked at validation and decoded after admission."""
    data: bytes
    field: str
    side: tuple[int, int]  # (height, width) to resize to

    def decode(self, limits: Limits) -> np.ndarray:
        return decode_image(self.data, self.field, limits, self.side)


def check_cost(h: int, w: int, steps: int, inverted: bool, limits: Limits) -> None:
    """Work per request against the budget, in native-image steps: (h x w / the model's native pixels) x steps,
    twice that for inversion (it walks the schedule up, then down). Refused at once, naming the size when even one
    step is too much, else the steps."""
    per_step = h * w / limits.default_side ** 2 * (2 if inverted else 1)
    if per_step * steps <= limits.cost_budget:
        return
    n = limits.default_side
    rule = (f"(height x width / {n}x{n}) x steps{' x 2 for inversion' if inverted else ''} must be at most "
            f"{limits.cost_budget:g}")
    if per_step > limits.cost_budget:
        raise invalid("params.height" if h >= w else "params.width", f"{h}x{w} pixels is over the work budget: {rule}")
    fit = int(limits.cost_budget // per_step)
    raise invalid("params.steps", f"{steps} steps at {h}x{w} pixels are over the work budget (at most {fit} fit): "
                                  f"{rule}")


def to_pipeline_request(msg: pb.GenerateRequest, limits: Limits) -> Request:
    """The whole conversion, image decoding included (the service decodes later: `parse_request`)."""
    req, image = parse_request(msg, limits)
    if image is not None:
        req.init_image = image.decode(limits)
    return req


def parse_request(msg: pb.GenerateRequest, limits: Limits) -> tuple[Request, PendingImage | None]:
    """Everything that is cheap to check: the request, and its image (if any) header-checked but not decoded."""
    p = msg.params
    steps = p.steps or limits.default_steps
    if not 1 <= steps <= limits.max_steps:
        raise invalid("params.steps", f"must be in 1..{limits.max_steps}, got {steps}")
    guidance = p.guidance if p.guidance != 0 else limits.default_guidance
    if not math.isfinite(guidance) or not 1.0 <= guidance <= 30.0:
        raise invalid("params.guidance", f"must be in [1, 30], got {guidance}")
    sides = []
    fixed = limits.backend.latent_size
    for axis, (name, v) in enumerate((("params.height", p.height), ("params.width", p.width))):
        v = v or limits.default_size()[axis]
        unit = limits.vae_scale_factor * 2  # the UNet halves the latent once more
        if fixed is not None and v != fixed[axis] * limits.vae_scale_factor:
            h, w = (n * limits.vae_scale_factor for n in fixed)
            raise invalid(name, f"must be {fixed[axis] * limits.vae_scale_factor}: this backend's graphs were built "
                                f"for {h}x{w} pixels (height x width), got {v}")
        if v % unit or not unit * 2 <= v <= limits.max_side:
            raise invalid(name, f"must be a multiple of {unit} in {unit * 2}..{limits.max_side}, got {v}")
        sides.append(v)
    req = Request(steps=steps, guidance=float(guidance), seed=int(p.seed),
                  negative_prompt=_prompt(p.negative_prompt, "params.negative_prompt"),
                  height=sides[0], width=sides[1])
    if limits.backend.max_batch is not None and req.batch > limits.backend.max_batch:
        raise invalid("params", f"{req.batch} image(s) per request exceed this backend's maximum batch of "
                                f"{limits.backend.max_batch}")
    kind = msg.WhichOneof("input")
    if kind is None:
        raise invalid("input", "one of text, embedding or inverted_latent is required")
    check_cost(req.height, req.width, req.steps, kind == "inverted_latent", limits)
    image = None
    if kind == "text":
        req.prompt = _prompt(msg.text.prompt, "text.prompt")
    elif kind == "embedding":
        e = msg.embedding
        req.prompt = _prompt(e.prompt, "embedding.prompt")
        if not 1 <= len(e.embeddings) <= MAX_EMBEDDINGS:
            raise invalid("embedding.embeddings", f"must hold 1 to {MAX_EMBEDDINGS} learned embeddings")
        learned = {}
        for i, emb in enumerate(e.embeddings):
            f = f"embedding.embeddings[{i}]"
            if not emb.token.strip() or len(emb.token) > 64:
                raise invalid(f"{f}.token", "must be a non-empty placeholder of at most 64 characters")
            if emb.token in learned:
                raise invalid(f"{f}.token", f"duplicate placeholder {clip(emb.token)}")
            if emb.token not in e.prompt:
                raise invalid(f"{f}.token", f"placeholder {clip(emb.token)} does not occur in embedding.prompt")
            if not emb.HasField("vectors"):
                raise invalid(f"{f}.vectors", "is required")
            arr = tensor_from_wire(emb.vectors, f"{f}.vectors")
            arr = arr[None] if arr.ndim == 1 else arr
            if arr.ndim != 2 or arr.shape[1] != limits.embed_dim or not 1 <= arr.shape[0] <= MAX_VECTORS:
                raise invalid(f"{f}.vectors.shape", f"must be [n, {limits.embed_dim}] with n in 1..{MAX_VECTORS}, "
                                                    f"got {clip(list(emb.vectors.shape))}")
            norm = float(np.linalg.norm(arr.astype(np.float64), axis=1).max())
            if norm > limits.max_embedding_norm:
                raise invalid(f"{f}.vectors.data", f"each vector's L2 norm must be at most "
                                                   f"{limits.max_embedding_norm:g}, got {norm:.3g}")
            learned[emb.token] = torch.from_numpy(arr.copy())
        req.learned = learned
    else:
        inv = msg.inverted_latent
        req.prompt = _prompt(inv.prompt, "inverted_latent.prompt")
        req.inversion_prompt = _prompt(inv.inversion_prompt, "inverted_latent.inversion_prompt")
        req.invert_with = "standard" if inv.invert_with == pb.INVERSION_MODEL_STANDARD else "erased"
        source = inv.WhichOneof("source")
        if source is None:
            raise invalid("inverted_latent.source", "one of image or latent is required")
        if source == "image":
            check_image_header(inv.image, "inverted_latent.image", limits)
            image = PendingImage(inv.image, "inverted_latent.image", (req.height, req.width))
        else:
            arr = tensor_from_wire(inv.latent, "inverted_latent.latent")
            arr = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
            want = [limits.latent_channels, req.height // limits.vae_scale_factor, req.width // limits.vae_scale_factor]
            if list(arr.shape) != want:
                raise invalid("inverted_latent.latent.shape",
                              f"must be {want} (or [1, ...]), got {clip(list(inv.latent.shape))}")
            peak = float(np.abs(arr).max())
            if peak > limits.max_latent_abs:
                raise invalid("inverted_latent.latent.data", f"values must be within +-{limits.max_latent_abs:g}, "
                                                             f"got {peak:.3g}")
            req.init_latent = torch.from_numpy(arr.copy())
    return req, image


def irece_config(msg: pb.GenerateRequest, operator: IreceConfig, allowed: set[str]) -> IreceConfig | None:
    """The operator's concepts plus the request's; request overrides may only strengthen suppression."""
    if len(msg.suppress_concepts) > MAX_SUPPRESS:
        raise invalid("suppress_concepts", f"at most {MAX_SUPPRESS} entries")
    extra = []
    for i, c in enumerate(msg.suppress_concepts):
        if c not in allowed:  # the catalogue is not listed: it includes the operator's concepts
            raise invalid(f"suppress_concepts[{i}]", f"unknown concept {clip(c)}")
        if c not in operator.concepts and c not in extra:
            extra.append(c)
    tau, stricter = operator.tau, None
    if msg.HasField("irece"):
        o = msg.irece
        if o.disable and (operator.concepts or extra):
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "irece.disable",
                               "IRECE is required by the operator's policy and cannot be switched off")
        if o.HasField("tau"):
            if not math.isfinite(o.tau) or not 0.0 <= o.tau <= 1.0:
                raise invalid("irece.tau", f"must be in [0, 1], got {o.tau}")
            if o.tau > operator.tau:
                raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "irece.tau",
                                   "would weaken the operator's policy; only a stricter (smaller) tau is allowed")
            tau = stricter = o.tau
    concepts = tuple(operator.concepts) + tuple(extra)
    if not concepts:
        return None
    # a stricter request tau applies to every concept, tuned ones included (never loosening them)
    per_concept = {c: ({**o, "tau": min(o.get("tau", tau), stricter)} if stricter is not None else o)
                   for c, o in operator.per_concept.items()}
    return replace(operator, concepts=concepts, tau=tau, per_concept=per_concept)
