"""`irece serve` and `irece client` verbs."""
from __future__ import annotations

import argparse
import json
import sys

from irece_runtime.irece import CONDITIONING, CONDITIONING_UNETS, GATES, NONFINITE, parse_t_star
from irece_runtime.policy import POLICIES, RECOMMENDED


SERVE_FLAGS = ("model", "erased", "backend", "graphs", "port", "metrics_port", "host", "workers", "queue_size", "tau",
               "t_star", "gate", "threshold", "device", "tls_cert", "tls_key", "auth_token_file", "max_side",
               "cost_budget", "max_request_seconds", "drain_seconds", "nonfinite", "batching", "max_batch",
               "gather_ms", "threads", "conditioning", "conditioning_unet", "recheck", "hide_scores", "policy", "grow",
               "negative_guidance", "negative_guidance_steps", "negative_guidance_every", "keep_outside", "keep_others")


def serve_overrides(a) -> dict:
    """The config fields that `irece serve`'s flags set (they override the --config file)."""
    overrides = {key: getattr(a, key) for key in SERVE_FLAGS if getattr(a, key) is not None}
    if a.concept:
        overrides["concepts"] = list(a.concept)
    if a.insecure:
        overrides["insecure"] = True
    return overrides


def cmd_serve(a):
    from .config import configure
    if a.ray is not None:  # every replica builds its config from the same file and flags
        from .ray_serve import serve_on_ray
        serve_on_ray(a.config, serve_overrides(a), replicas=a.replicas, max_replicas=a.max_replicas,
                     address=None if a.ray == "local" else a.ray, replica_cpus=a.replica_cpus,
                     router_queue=a.router_queue, metrics_export_port=a.ray_metrics_port)
        return
    from .app import serve
    # refuses to start (ValueError: `irece: error: ...`, exit 2) on half a TLS config
    serve(configure(a.config, serve_overrides(a)))


def cmd_client(a):
    import grpc
    from .client import run_client
    try:
        out = run_client(a)
    except grpc.RpcError as exc:
        print(json.dumps({"error": exc.code().name, "message": exc.details()}) if a.json
              else f"irece client: {exc.code().name}: {exc.details()}", file=sys.stderr)
        raise SystemExit(1)
    print(json.dumps(out) if a.json else f"wrote {out['output']} (irece: {out['irece']})")


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC generation server")
    p.add_argument("--config", help="TOML or JSON server config (flags below override it)")
    p.add_argument("--model")
    p.add_argument("--erased")
    p.add_argument("--concept", action="append", help="operator concept, always suppressed (repeatable)")
    p.add_argument("--backend", choices=("torch", "onnx", "tensorrt"))
    p.add_argument("--graphs", help="exported graph folder from `irece export` (onnx/tensorrt backends)")
    p.add_argument("--device")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--workers", type=int, help="requests generating at once (default: --max-batch when batching, "
                                                "else 1)")
    p.add_argument("--queue-size", type=int, help="requests waiting beyond --workers; more: RESOURCE_EXHAUSTED")
    p.add_argument("--batching", action=argparse.BooleanOptionalAction, default=None,
                   help="step-level batching: one scheduler runs the engine calls of all generating requests "
                        "together (default: on); --no-batching: one denoising loop per worker thread")
    p.add_argument("--max-batch", type=int, help="images per engine call when batching (default 16; a UNet call "
                                                  "carries both guidance branches, 2 x this)")
    p.add_argument("--threads", type=int, help="intra-op threads of torch and ONNX Runtime (default: theirs)")
    p.add_argument("--gather-ms", type=float, help="an idle scheduler waits this long for requests arriving "
                                                    "together (default 2)")
    p.add_argument("--policy", choices=tuple(POLICIES),
                   help=f"named defence (default with --concept: {RECOMMENDED!r}, the recommended one, its numbers from "
                        "the model's calibration block; 'paper': the seed paper's always-on IRECE); the flags below "
                        "override its fields")
    p.add_argument("--tau", type=float, help="localization threshold")
    p.add_argument("--t-star", type=parse_t_star, help="intervention step: a fraction or a step index")
    p.add_argument("--gate", choices=GATES, help="presence gate ('off': always intervene)")
    p.add_argument("--threshold", type=float, help="presence gate's threshold")
    p.add_argument("--grow", type=int, help="cells by which IRECE's mask grows before re-noising")
    p.add_argument("--negative-guidance", type=float, metavar="G",
                   help="steer re-noised regions away from their concepts with this scale (0: off)")
    p.add_argument("--negative-guidance-steps", type=int, metavar="K",
                   help="steer only the K steps after each re-noising (0: to the end)")
    p.add_argument("--negative-guidance-every", type=int, metavar="E",
                   help="the standard UNet's steering direction computed every E steps and reused between (1: each "
                        "step)")
    p.add_argument("--keep-outside", action=argparse.BooleanOptionalAction, default=None,
                   help="inverted images: only IRECE's mask is redrawn, the rest stays the input's")
    p.add_argument("--keep-others", action=argparse.BooleanOptionalAction, default=None,
                   help="with the head gate and keep_outside: other concepts' pixels inside the mask stay the input's")
    p.add_argument("--conditioning", choices=CONDITIONING,
                   help="after IRECE re-noises an image: keep its conditioning (the paper) or denoise it on the "
                        "negative/null prompt from then on (null)")
    p.add_argument("--conditioning-unet", choices=CONDITIONING_UNETS,
                   help="classifier gate: which UNet reads a request's conditioning for --conditioning null")
    p.add_argument("--recheck", nargs="*", type=parse_t_star, metavar="T",
                   help="later points of the schedule where IRECE runs again (fractions or step indices; none: no "
                        "recheck)")
    p.add_argument("--hide-scores", action="store_true", default=None,
                   help="responses carry no presence score, threshold or attention peak (NaN): a query-based "
                        "attacker cannot read how far an image stands from the gate's threshold")
    p.add_argument("--nonfinite", choices=NONFINITE,
                   help="NaN/inf at t*: refuse the request (error, default) or re-noise the whole latent")
    p.add_argument("--tls-cert", help="PEM certificate chain; needs --tls-key (half a TLS config refuses to start)")
    p.add_argument("--tls-key", help="PEM private key; needs --tls-cert")
    p.add_argument("--auth-token-file", help="bearer tokens, one a line; without TLS only on a loopback --host")
    p.add_argument("--insecure", action="store_true",
                   help="allow bearer tokens without TLS on a non-loopback host (they travel in clear)")
    p.add_argument("--max-side", type=int, help="largest image side in pixels (default: twice the model's)")
    p.add_argument("--cost-budget", type=float,
                   help="work per request in native-image steps (default: 2 x max_steps)")
    p.add_argument("--max-request-seconds", type=float, help="hard limit on one request's generation time")
    p.add_argument("--drain-seconds", type=float, help="on SIGTERM, how long running requests get to finish")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="serve on Ray Serve: --replicas copies of the service behind Ray's gRPC proxy on --port; a "
                        "local Ray instance, or the cluster at ADDRESS (needs the ray extra: pip install 'irece[ray]')")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (the minimum when autoscaling)")
    p.add_argument("--max-replicas", type=int,
                   help="with --ray: autoscale up to this many replicas on ongoing requests (target: --workers each)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs each replica reserves")
    p.add_argument("--router-queue", type=int, help="with --ray: requests Ray's router holds for a free replica, per "
                   "proxy, before RESOURCE_EXHAUSTED (default: the deployment's capacity; -1: no bound)")
    p.add_argument("--ray-metrics-port", type=int,
                   help="with a local --ray: the port where Ray's metrics agent serves every replica's metrics "
                        "(default: --metrics-port)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="send one generation request to a server")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--prompt")
    p.add_argument("--embedding", help="learned embedding file; --prompt must contain its token")
    p.add_argument("--token", help="placeholder token for --embedding")
    p.add_argument("--image", help="reference image: an inverted-latent request")
    p.add_argument("--invert-with", choices=("erased", "standard"), default="erased")
    p.add_argument("--suppress", action="append", help="extra concept to suppress (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--token-auth", help="bearer token")
    p.add_argument("--tls-ca", help="CA certificate for a TLS server")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_client)
