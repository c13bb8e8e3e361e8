"""`irece client`: one request of any modality to a running server."""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from protos.irece.v1 import generation_pb2 as pb
from protos.irece.v1 import generation_pb2_grpc as pb_grpc

from . import report


def tensor_to_wire(arr: np.ndarray) -> pb.Tensor:
    arr = np.ascontiguousarray(arr, dtype="<f4")
    return pb.Tensor(dtype="float32", shape=list(arr.shape), data=arr.tobytes())


def build_request(prompt: str = "", embedding: str | None = None, token: str | None = None,
                  image: str | None = None, invert_with: str = "erased", seed: int = 0, steps: int = 0,
                  guidance: float = 0.0, suppress: list[str] | None = None) -> pb.GenerateRequest:
    params = pb.GenerationParams(seed=seed, steps=steps, guidance=guidance)
    req = pb.GenerateRequest(params=params, suppress_concepts=suppress or [])
    if image:
        req.inverted_latent.CopyFrom(pb.InvertedLatent(
            image=Path(image).read_bytes(), prompt=prompt,
            invert_with=pb.INVERSION_MODEL_STANDARD if invert_with == "standard" else pb.INVERSION_MODEL_ERASED))
    elif embedding:
        from irece_runtime.embeddings import load_learned_embedding
        learned = load_learned_embedding(embedding, token)
        req.embedding.CopyFrom(pb.EmbeddingPrompt(prompt=prompt, embeddings=[
            pb.LearnedEmbedding(token=k, vectors=tensor_to_wire(v.numpy())) for k, v in learned.items()]))
    else:
        req.text.CopyFrom(pb.TextPrompt(prompt=prompt))
    return req


def channel(target: str, tls_ca: str | None = None) -> grpc.Channel:
    if tls_ca:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
    return grpc.insecure_channel(target)


def run_client(a) -> dict:
    req = build_request(a.prompt or "", a.embedding, a.token, a.image, a.invert_with, a.seed, a.steps, a.guidance,
                        a.suppress)
    metadata = [("authorization", f"Bearer {a.token_auth}")] if a.token_auth else None
    with channel(a.target, a.tls_ca) as ch:
        resp = pb_grpc.GenerationStub(ch).Generate(req, timeout=a.timeout, metadata=metadata)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_bytes(resp.png)
    return {"output": a.out, "modality": resp.modality, "seed": resp.seed, "irece": report.to_dict(resp.irece),
            "timings_s": dict(resp.timings_s)}
