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


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.code, self.field = code, field


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, field, message)


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
        raise invalid(f"{field}.dtype", f"must be one of {sorted(DTYPES)}, got {t.dtype!r}")
    shape = list(t.shape)
    if not shape or any(d <= 0 for d in shape) or len(shape) > 4:
        raise invalid(f"{field}.shape", f"must be 1 to 4 positive dimensions, got {shape}")
    dtype = np.dtype(DTYPES[t.dtype]).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(t.data) != expected:
        raise invalid(f"{field}.data", f"has {len(t.data)} bytes, shape {shape} of {t.dtype} needs {expected}")
    arr = np.frombuffer(t.data, dtype=dtype).reshape(shape).astype(np.float32)
    if not np.isfinite(arr).all():
        raise invalid(f"{field}.data", "contains NaN or inf")
    return arr


def decode_image(data: bytes, field: str, limits: Limits, side: tuple[int, int]) -> np.ndarray:
    if not data:
        raise invalid(field, "is empty")
    if len(data) > limits.max_image_bytes:
        raise invalid(field, f"is {len(data)} bytes, more than the limit of {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ("PNG", "JPEG"):
                raise invalid(field, f"must be PNG or JPEG, got {img.format}")
            if img.width * img.height > limits.max_image_pixels:
                raise invalid(field, f"is {img.width}x{img.height}, more than {limits.max_image_pixels} pixels")
            img = img.convert("RGB")
            img.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise invalid(field, f"too many pixels ({exc})") from None
    except Exception as exc:  # PIL raises many types on corrupt data
        raise invalid(field, f"cannot be decoded as an image ({type(exc).__name__})") from None
    h, w = side
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    return np.asarray(img)


def to_pipeline_request(msg: pb.GenerateRequest, limits: Limits) -> Request:
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
    if kind == "text":
        req.prompt = _prompt(msg.text.prompt, "text.prompt")
    elif kind == "embedding":
        e = msg.embedding
        req.prompt = _prompt(e.prompt, "embedding.prompt")
        if not e.embeddings:
            raise invalid("embedding.embeddings", "at least one learned embedding is required")
        learned = {}
        for i, emb in enumerate(e.embeddings):
            f = f"embedding.embeddings[{i}]"
            if not emb.token.strip() or len(emb.token) > 64:
                raise invalid(f"{f}.token", "must be a non-empty placeholder of at most 64 characters")
            if emb.token in learned:
                raise invalid(f"{f}.token", f"duplicate placeholder {emb.token!r}")
            if emb.token not in e.prompt:
                raise invalid(f"{f}.token", f"placeholder {emb.token!r} does not occur in embedding.prompt")
            if not emb.HasField("vectors"):
                raise invalid(f"{f}.vectors", "is required")
            arr = tensor_from_wire(emb.vectors, f"{f}.vectors")
            arr = arr[None] if arr.ndim == 1 else arr
            if arr.ndim != 2 or arr.shape[1] != limits.embed_dim or not 1 <= arr.shape[0] <= MAX_VECTORS:
                raise invalid(f"{f}.vectors.shape", f"must be [n, {limits.embed_dim}] with n in 1..{MAX_VECTORS}, "
                                                    f"got {list(emb.vectors.shape)}")
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
            req.init_image = decode_image(inv.image, "inverted_latent.image", limits, (req.height, req.width))
        else:
            arr = tensor_from_wire(inv.latent, "inverted_latent.latent")
            arr = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
            want = [limits.latent_channels, req.height // limits.vae_scale_factor, req.width // limits.vae_scale_factor]
            if list(arr.shape) != want:
                raise invalid("inverted_latent.latent.shape",
                              f"must be {want} (or [1, ...]), got {list(inv.latent.shape)}")
            req.init_latent = torch.from_numpy(arr.copy())
    return req


def irece_config(msg: pb.GenerateRequest, operator: IreceConfig, allowed: set[str]) -> IreceConfig | None:
    """The operator's concepts plus the request's; request overrides may only strengthen suppression."""
    extra = []
    for i, c in enumerate(msg.suppress_concepts):
        if c not in allowed:
            raise invalid(f"suppress_concepts[{i}]", f"unknown concept {c!r}; known: {sorted(allowed)}")
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
                                   f"{o.tau} would weaken the operator's tau {operator.tau}; only <= is allowed")
            tau = stricter = o.tau
    concepts = tuple(operator.concepts) + tuple(extra)
    if not concepts:
        return None
    # a stricter request tau applies to every concept, tuned ones included (never loosening them)
    per_concept = {c: ({**o, "tau": min(o.get("tau", tau), stricter)} if stricter is not None else o)
                   for c, o in operator.per_concept.items()}
    return replace(operator, concepts=concepts, tau=tau, per_concept=per_concept)
