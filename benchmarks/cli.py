"""`irece bench crr | policy | adaptive | conditioning | tune | latency | localization | peers | presence | any-model | gate |
serve`."""
from __future__ import annotations

import json
from pathlib import Path

from irece_runtime.irece import GATES, PRESENCE_GATE, RECHECK, IreceConfig, parse_t_star
from irece_runtime.policy import POLICIES, RECOMMENDED
from miniworld.assets import MODEL_DIR as DEFAULT_MODEL

GATE_PARTS = ("wrong_concept", "benign", "pairs")  # benchmarks.gate.PARTS (imported lazily)

DEFAULTS = IreceConfig.defaults()
CLIENT_COUNTS = (1, 4, 8, 16)  # `irece bench serve` (benchmarks/serve.py, imported only when it runs)


def _write(obj: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1))


def cmd_crr(a):
    from . import crr, report
    s = crr.BenchSettings(tau=a.tau, t_star=a.t_star, seed=a.seed,
                          threshold=DEFAULTS.threshold if a.threshold is None else a.threshold,
                          defences=tuple(a.defences) if a.defences else crr.DEFENCES, gate=a.gate, grow=a.grow,
                          negative_guidance=a.negative_guidance, negative_guidance_steps=a.negative_guidance_steps)
    concepts, methods, scenarios = a.concepts, a.methods, tuple(a.scenarios or crr.SCENARIOS)
    if a.quick:
        s.n, s.n_preserve, s.erase_steps, s.ti_steps = 2, 1, 20, 20
        concepts = concepts or ["star"]
    if a.n:
        s.n = a.n
    res = crr.run(a.model, concepts or list(crr.shapes.CONCEPTS), methods or list(crr.METHODS), scenarios, s,
                  ray=a.ray, ray_cpus=a.ray_cpus, ray_threads=a.ray_threads)
    _publish(res, a, report.crr_markdown, report.crr_chart)


def cmd_policy(a):
    from . import policy
    methods, concepts = a.methods or list(policy.METHODS), a.concepts or list(policy.shapes.CONCEPTS)
    n, n_pairs = a.n or 16, a.n_pairs
    if a.quick:  # one method, one concept, two images a cell: wires every part through in minutes
        methods, concepts = a.methods or ["uce"], a.concepts or ["star"]
        n, n_pairs = a.n or 2, min(n_pairs, 4)
    res = policy.run(a.model, a.policy, methods, concepts, n=n, n_pairs=n_pairs, parts=tuple(a.parts),
                     seed=a.seed, ray=a.ray, adaptive_concept=concepts[0] if a.quick else "star", quick=a.quick)
    _write(res, a.json)
    md = policy.markdown(res)
    print(md)
    if a.markdown:
        Path(a.markdown).write_text(md)


def _publish(res: dict, a, markdown, chart) -> None:
    """JSON to --json, the markdown table printed and to --markdown, the chart to --chart."""
    _write(res, a.json)
    md = markdown(res)
    print(md)
    if a.markdown:
        Path(a.markdown).write_text(md)
    if a.chart:
        chart(res, a.chart)


def cmd_adaptive(a):
    from . import adaptive
    s = adaptive.AdaptiveSettings(t_star=a.t_star, seed=a.seed, model=a.model,
                                  threshold=DEFAULTS.threshold if a.threshold is None else a.threshold)
    methods, attack_names = a.methods or ["uce", "esd-x", "esd-u", "receler"], a.attacks or list(adaptive.BUDGET_UNITS)
    s.n, s.budgets = 16, dict(adaptive.FULL_BUDGETS)
    if a.quick:
        s.n, s.steps, s.erase_steps, s.ti_steps = 2, 10, 20, 20
        s.budgets = dict(adaptive.QUICK_BUDGETS)
        methods = a.methods or ["uce"]
    if a.n:
        s.n = a.n
    for spec in a.budget or []:
        name, _, values = spec.partition("=")
        if name not in adaptive.BUDGET_UNITS:
            raise ValueError(f"--budget {spec!r}: the attack must be one of {list(adaptive.BUDGET_UNITS)}")
        s.budgets[name] = sorted({0, *(int(v) for v in values.split(","))})
    if a.benign_only:  # benign learned embeddings of other concepts under each defence (no attack)
        from miniworld.shapes import CONCEPTS
        others = a.others or [c for c in CONCEPTS if c != a.concept][:1 if a.quick else 3]
        rows = adaptive.benign_embeddings(a.model, a.concept, methods, others, s)
        _write({"settings": s.__dict__, "benign_embeddings": rows}, a.json)
        print(json.dumps(rows, indent=1))
        return
    res = adaptive.run(a.model, a.concept, methods, attack_names, s, policy=a.policy)
    _publish(res, a, adaptive.markdown, adaptive.chart)


def cmd_conditioning(a):
    from . import conditioning
    from .crr import BenchSettings
    s = BenchSettings(n=a.n or 16, t_star=a.t_star, seed=a.seed,
                      threshold=DEFAULTS.threshold if a.threshold is None else a.threshold)
    if a.quick:
        s.n, s.steps, s.erase_steps, s.ti_steps = 4, 10, 20, 20
    res = conditioning.run(a.model, a.concept, a.methods or (["uce"] if a.quick else ["uce", "esd-x", "esd-u", "receler"]),
                           s, a.max_fpr)
    _publish(res, a, conditioning.markdown, None)


def cmd_tune(a):
    from . import tune
    from .crr import BenchSettings
    s = BenchSettings(n=a.n or 10, n_preserve=2, seed=a.seed)
    t_stars, taus = tune.T_STARS, tune.TAUS
    concepts = a.concepts or list(tune.shapes.CONCEPTS)
    if a.quick:
        s.n, s.n_preserve, s.erase_steps = 2, 1, 20
        t_stars, taus, concepts = (0.2, 0.4), (0.3, 0.5), a.concepts or ["star"]
    res = tune.tune(a.model, a.method, concepts, s, t_stars, taus, gate=a.gate,
                    n_calibration=12 if a.quick else a.n_calibration, max_fpr=a.max_fpr)
    _write(res, a.json)
    toml = tune.server_config(res, concepts)
    if a.config_out:
        Path(a.config_out).write_text(toml)
    if a.chart:
        tune.sweep_chart(res, a.chart)
    print(toml)


def cmd_latency(a):
    from . import latency
    steps, n = a.steps, a.n or 10
    if a.quick:
        n = min(n, 4)
    res = latency.measure(a.model, a.erased, a.graphs, steps=steps, n=n, modality=a.modality, threshold=a.threshold,
                          classifier_timesteps=a.classifier_timesteps,
                          shows=a.shows, t_star=a.t_star, gate=a.gate, grow=a.grow, recheck=a.recheck,
                          negative_guidance=a.negative_guidance, negative_guidance_steps=a.negative_guidance_steps,
                          policy=a.policy)
    if a.server:
        res["server"] = latency.measure_server(a.model, a.erased, steps=steps, per_client=2 if a.quick else 4,
                                               clients=(1, 2) if a.quick else (1, 4, 8))
    _write(res, a.json)
    print(json.dumps(res, indent=1))


def cmd_peers(a):
    from . import peers
    n, warmup, steps = (a.n or 10), 2, a.steps
    if a.quick:
        n, warmup = min(n, 3), 1
    res = peers.run(a.model, a.erased, a.graphs, steps=steps, n=n, warmup=warmup, device=a.device,
                    peers_python=a.peers_python, systems=tuple(a.systems) if a.systems else None)
    _write(res, a.json)
    md = peers.markdown(res)
    print(md)
    if a.markdown:
        Path(a.markdown).write_text(md)


def cmd_localization(a):
    from . import localization
    n, pairs = (10, 2) if a.quick else (a.n or 100, 20)
    layers = tuple(a.localizer_layers) if a.localizer_layers else None
    if a.head_targets:  # the masks `irece head train` learns from, not a look's
        res = localization.head_targets(a.model, n=8 if a.quick else (a.n or 48), n_pairs=8 if a.quick else 48)
    else:
        res = localization.run(a.model, n=n, n_pairs=pairs, tau=a.tau, t_star=a.t_star, layers=layers, gate=a.gate,
                               threshold=a.threshold, grow=a.grow)
    _write(res, a.json)
    print(json.dumps(res, indent=1))


def cmd_presence(a):
    from . import presence
    res = presence.run(a.model, n=a.n or (12 if a.quick else 100), steps=10 if a.quick else 25, tau=a.tau,
                       t_star=a.t_star, gate=a.gate, classifier_timesteps=a.classifier_timesteps)
    if a.write_calibration:  # the head gate's numbers, stored beside the head for the named policies
        from irece_runtime.policy import write_calibration
        if a.gate != "head":
            raise ValueError("--write-calibration stores the concept head's calibration: it needs --gate head")
        looks = [presence.run(a.model, n=a.n or 100, steps=25, tau=a.tau, t_star=when, gate="head")
                 for when in a.looks]
        res["looks"] = looks
        res["written"] = str(write_calibration(a.model, presence.calibration_block(res, looks)))
    _write(res, a.json)
    print(json.dumps({k: v for k, v in res.items() if k != "by_concept"}, indent=1))


def cmd_gate(a):
    from . import gate
    from .crr import BenchSettings
    s = BenchSettings(n=a.n or (2 if a.quick else 16), seed=a.seed, t_star=a.t_star, tau=a.tau)
    if a.quick:
        s.steps, s.erase_steps = 10, 20
    res = gate.run(a.model, concept=a.concept, wrong=a.wrong, methods=a.methods,
                   n_pairs=a.n_pairs or (4 if a.quick else 20),
                   threshold=a.threshold, s=s, parts=a.parts, gate=a.gate,
                   grow=a.grow, pairs_erased=a.pairs_erased, negative_guidance=a.negative_guidance,
                   negative_guidance_steps=a.negative_guidance_steps)
    _write(res, a.json)
    print(json.dumps(res, indent=1))


def cmd_serve(a):
    from . import serve
    spec = serve.Spec(model=a.model, erased=a.erased, graphs=a.graphs, concept=a.concept, steps=a.steps,
                      clients=tuple(a.clients), requests=a.requests, threads=a.threads, max_batch=a.max_batch,
                      gather_ms=a.gather_ms, unbatched_workers=a.unbatched_workers, ray_replicas=a.ray_replicas)
    if a.quick:
        spec.steps, spec.requests, spec.warmup, spec.rounds = min(spec.steps, 10), min(spec.requests, 8), 3, 2
    res = serve.run(spec, backends=tuple(a.backends), modes=tuple(a.modes))
    _write(res, a.json)
    md = serve.markdown(res)
    print(md)
    if a.markdown:
        Path(a.markdown).write_text(md)


def cmd_any_model(a):
    from . import any_model
    res = any_model.run(a.folder, tuple(a.concepts), small=a.small, n=a.n or 8, steps=a.steps, device=a.device,
                        keep=a.keep)
    _write(res, a.json)
    print(json.dumps(res, indent=1))
    if not res["ok"]:
        raise SystemExit(1)


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: CRR table, tuning, latency, localization")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)

    def common(p):
        p.add_argument("--model", default=str(DEFAULT_MODEL))
        p.add_argument("--quick", action="store_true", help="a small run (minutes) that wires everything through")
        p.add_argument("--json", metavar="FILE", help="write the results as JSON")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--n", type=int, help="images per cell")

    p = bsub.add_parser("crr", help="CRR per method x scenario x concept, IRECE off and on")
    common(p)
    p.add_argument("--concepts", nargs="+")
    p.add_argument("--methods", nargs="+", choices=("standard", "uce", "esd-x", "esd-u", "receler"))
    p.add_argument("--tau", type=float, default=DEFAULTS.tau)
    p.add_argument("--t-star", type=parse_t_star, default=DEFAULTS.t_star, help="a fraction (0.3) or a step index (7)")
    p.add_argument("--threshold", type=float, help="the gated defence's presence threshold (default: IreceConfig's)")
    p.add_argument("--defences", nargs="+",
                   choices=("none", "irece-paper", "irece-gated", "full", "full-keep", "gated+recheck")
                   + tuple(f"policy:{name}" for name in POLICIES),
                   help="defences to compare (default: none irece-paper irece-gated; full adds the conditioning "
                        "defence and a recheck to irece-gated; full-keep adds keep_outside to full; gated+recheck "
                        "adds the recheck alone; policy:NAME: a named policy exactly as the server runs it)")
    p.add_argument("--gate", choices=[g for g in GATES if g != "off"], default=PRESENCE_GATE,
                   help="the gated defences' presence gate (full and full-keep need the classifier)")
    p.add_argument("--grow", type=int, default=0, help="cells the gated defences' masks grow by")
    p.add_argument("--negative-guidance", type=float, default=0.0, metavar="G",
                   help="the gated defences steer re-noised regions away from the concept (the paper's rows: 0)")
    p.add_argument("--negative-guidance-steps", type=int, default=0, metavar="K",
                   help="... for the K steps after each re-noising only (0: to the end)")
    p.add_argument("--scenarios", nargs="+", choices=("text", "adv_prompt", "ti_white", "ti_black", "inv_white_null",
                                                       "inv_white_prompt", "inv_black_null", "inv_black_prompt"))
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--chart", metavar="PNG")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the missing (method, concept) cells as Ray tasks: a local Ray instance, or the cluster at "
                        "ADDRESS; same cache, same table (needs the ray extra: pip install 'irece[ray]')")
    p.add_argument("--ray-cpus", type=int, help="with a local --ray: CPUs (default: this process's CPU affinity)")
    p.add_argument("--ray-threads", type=int,
                   help="with --ray: torch threads per cell (default: this process's; the sequential run's result "
                        "is reproduced with the same thread count)")
    p.set_defaults(func=cmd_crr)

    p = bsub.add_parser("policy", help="one table for a named policy on the committed world: every CRR scenario x "
                                       "concept x erasure method, the wrong-concept control, benign requests, two-shape "
                                       "scenes; the paper's policy in every part")
    common(p)
    p.add_argument("--policy", choices=tuple(POLICIES), default=RECOMMENDED)
    p.add_argument("--concepts", nargs="+")
    p.add_argument("--methods", nargs="+", choices=("uce", "esd-x", "esd-u", "receler"))
    parts = ("crr", "benign", "pairs", "adaptive")  # benchmarks.policy.PARTS (not imported: the CLI starts light)
    p.add_argument("--parts", nargs="+", choices=parts, default=list(parts),
                   help="adaptive: the attacks of bench adaptive aimed at the policy (on star)")
    p.add_argument("--n-pairs", type=int, default=100, help="two-shape scenes per method")
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="the CRR cells as Ray tasks (a local Ray instance, or the cluster at ADDRESS)")
    p.set_defaults(func=cmd_policy)

    p = bsub.add_parser("adaptive", help="attacks that know the defence: TI through it, PGD and query search "
                                         "against its gate (issue #12)")
    common(p)
    p.add_argument("--concept", default="star")
    p.add_argument("--methods", nargs="+", choices=("uce", "esd-x", "esd-u", "receler"))
    p.add_argument("--attacks", nargs="+", choices=("ti", "pgd", "pgd-bb", "prompt"))
    p.add_argument("--budget", action="append", metavar="ATTACK=B1,B2",
                   help="budgets of one attack (0 is always measured), e.g. ti=10,25,50 (repeatable)")
    p.add_argument("--t-star", type=parse_t_star, default=DEFAULTS.t_star, help="a fraction (0.3) or a step index (7)")
    p.add_argument("--threshold", type=float, help="the gate's presence threshold (default: IreceConfig's)")
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--chart", metavar="PNG", help="CRR against budget under the attacked defence")
    p.add_argument("--policy", choices=tuple(POLICIES),
                   help="attack this named policy, exactly as the server runs it (the paper's policy beside it) "
                        "instead of the tables' defences")
    p.add_argument("--benign-only", action="store_true",
                   help="no attack: benign learned embeddings (white-box TI of other concepts) under each defence")
    p.add_argument("--others", nargs="+", help="with --benign-only: the other concepts (default: the first three)")
    p.set_defaults(func=cmd_adaptive)

    p = bsub.add_parser("conditioning", help="the conditioning defence's threshold: calibrated on one split (benign "
                                             "prompts and embeddings vs TI of the erased concept), checked on another")
    common(p)
    p.add_argument("--concept", default="star")
    p.add_argument("--methods", nargs="+", choices=("uce", "esd-x", "esd-u", "receler"))
    p.add_argument("--t-star", type=parse_t_star, default=DEFAULTS.t_star, help="a fraction (0.3) or a step index (7)")
    p.add_argument("--threshold", type=float, help="the gate's presence threshold (default: IreceConfig's)")
    p.add_argument("--max-fpr", type=float, default=0.01,
                   help="share of benign calibration generations allowed to lose their conditioning")
    p.add_argument("--markdown", metavar="FILE")
    p.set_defaults(func=cmd_conditioning, chart=None)

    p = bsub.add_parser("tune", help="sweep t* and tau; per-concept choice on a calibration split")
    common(p)
    p.add_argument("--method", default="uce")
    p.add_argument("--concepts", nargs="+")
    p.add_argument("--config-out", metavar="TOML", help="write the choice in the server's config format")
    p.add_argument("--gate", choices=GATES, default="off",
                   help="classifier or head: calibrate that gate's presence threshold first, and tune with it on")
    p.add_argument("--n-calibration", type=int, default=100, help="calibration scenes for the presence threshold")
    p.add_argument("--max-fpr", type=float, default=0.03,
                   help="presence threshold rule: most concepts caught with at most this share of absent ones")
    p.add_argument("--chart", metavar="PNG")
    p.set_defaults(func=cmd_tune)

    p = bsub.add_parser("latency", help="latency/throughput/memory, IRECE off vs on, per backend and via gRPC")
    common(p)
    p.add_argument("--erased")
    p.add_argument("--graphs", help="exported graph folder (adds the onnx / tensorrt backends)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--modality", choices=("text", "embedding", "inverted_latent"), default="text",
                   help="embedding: a learned embedding of the shown concept (textual inversion, cached)")
    p.add_argument("--t-star", type=parse_t_star, help="IRECE's t* (default: IreceConfig's)")
    p.add_argument("--shows", help="the concept the requests show (default: star, IRECE's target; another concept: "
                                   "benign traffic)")
    p.add_argument("--server", action="store_true", help="also measure through the gRPC server (1, 4, 8 clients)")
    p.add_argument("--threshold", type=float, help="the gated setting's presence threshold (default: IreceConfig's)")
    p.add_argument("--classifier-timesteps", nargs="+", type=int, metavar="T",
                   help="the gated setting's re-noising timesteps (default: IreceConfig's)")
    p.add_argument("--gate", choices=[g for g in GATES if g != "off"], default=PRESENCE_GATE,
                   help="the gated setting's presence gate")
    p.add_argument("--grow", type=int, default=0, help="the gated setting's mask growth in cells")
    p.add_argument("--recheck", action="store_true", help="also the gate with its later looks (gated+recheck)")
    p.add_argument("--policy", choices=tuple(POLICIES),
                   help="also the named policy, exactly as the server runs it (the paper's policy is always a row)")
    p.add_argument("--negative-guidance", type=float, default=0.0, metavar="G",
                   help="also the last gated setting with re-noised regions steered away from the concept (+neg)")
    p.add_argument("--negative-guidance-steps", type=int, default=0, metavar="K",
                   help="also +neg steering the K steps after each re-noising only (+negK)")
    p.set_defaults(func=cmd_latency)

    p = bsub.add_parser("peers", help="side by side with diffusers and optimum on the same model, interleaved")
    common(p)
    p.add_argument("--erased", help="erased UNet (UCE/ESD) for all systems; default: the model's own")
    p.add_argument("--graphs", help="our exported graph folder; default: exported once into .cache/bench")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--peers-python", default=None, help="python of the optimum virtualenv (default .venv-peers)")
    p.add_argument("--systems", nargs="+", metavar="NAME", help="a subset: diffusers optimum irece-torch irece-onnx")
    p.add_argument("--markdown", metavar="FILE")
    p.set_defaults(func=cmd_peers)

    p = bsub.add_parser("localization", help="IRECE masks vs the renderer's ground truth; inversion PSNR")
    common(p)
    p.add_argument("--tau", type=float, default=DEFAULTS.tau)
    p.add_argument("--t-star", type=parse_t_star, default=DEFAULTS.t_star, help="a fraction (0.3) or a step index (7)")
    p.add_argument("--localizer-layers", nargs="+", metavar="NAME")
    p.add_argument("--gate", choices=GATES, default=DEFAULTS.gate, help="masks of the paper (off), the paper's behind the classifier gate, or the concept head's (head)")
    p.add_argument("--threshold", type=float, default=DEFAULTS.threshold)
    p.add_argument("--grow", type=int, default=0, help="grow IRECE's mask by this many cells (the paper's rows: 0)")
    p.add_argument("--head-targets", action="store_true",
                   help="score instead the cells `irece head train` takes as targets (head_training.targets)")
    p.set_defaults(func=cmd_localization)

    p = bsub.add_parser("presence", help="presence gate: presence-score AUC and calibrated threshold")
    common(p)
    p.add_argument("--gate", choices=[g for g in GATES if g != "off"], default="classifier",
                   help="the presence score: diffusion classifier, competing cross-attention or the concept head")
    p.add_argument("--classifier-timesteps", nargs="+", type=int, metavar="T",
                   help="the classifier gate's re-noising timesteps (default: IreceConfig's)")
    p.add_argument("--write-calibration", action="store_true",
                   help="--gate head: store t*, tau and the threshold (with the splits and FPR budget) in the model's "
                        "concept_head/config.json, where the named policies read them")
    p.add_argument("--looks", nargs="*", type=float, default=list(RECHECK), metavar="T",
                   help="with --write-calibration: the recheck looks, each calibrated at its own point (default: "
                        "%(default)s)")
    p.add_argument("--tau", type=float, default=DEFAULTS.tau)
    p.add_argument("--t-star", type=parse_t_star, default=DEFAULTS.t_star, help="a fraction (0.3) or a step index (7)")
    p.set_defaults(func=cmd_presence)

    p = bsub.add_parser("serve", help="concurrent clients against the server: batched vs unbatched (and other "
                                      "serving modes), per backend, in one run")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--quick", action="store_true", help="10 steps, 8 requests per client count: a few minutes")
    p.add_argument("--json", metavar="FILE", help='write {"rows": [{mode, backend, clients, rps, p50_ms, p95_ms, '
                                                  'mean_batch, ...}], "ratios": ...}')
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--erased", help="erased UNet; default: the model's own (every mode does the same work)")
    p.add_argument("--graphs", help="ONNX graph folder for the onnx backend; default: exported once into .cache/bench")
    p.add_argument("--backends", nargs="+", choices=("torch", "onnx"), default=["torch", "onnx"])
    p.add_argument("--modes", nargs="+", default=["batched", "unbatched", "ray"],
                   help="serving modes (benchmarks/serve.py MODES; ray needs the irece[ray] extra)")
    p.add_argument("--ray-replicas", type=int, default=2, help="replicas of the ray mode")
    p.add_argument("--clients", nargs="+", type=int, default=list(CLIENT_COUNTS))
    p.add_argument("--requests", type=int, default=32, help="requests per mode and client count")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--concept", default="star", help="the operator's concept (IRECE on for every request)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each server process")
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch (and --workers)")
    p.add_argument("--gather-ms", type=float, default=2.0)
    p.add_argument("--unbatched-workers", type=int, default=2, help="worker threads of the unbatched server")
    p.set_defaults(func=cmd_serve)

    p = bsub.add_parser("any-model", help="the renderer-free path command by command on any SD v1.x folder (default: the "
                                          "SD v1.4 architecture at random weights): head train, calibrate, serve, "
                                          "one request per modality; each command's exit status and time")
    p.add_argument("--folder", help="an SD v1.x diffusers folder (default: build the SD v1.4 architecture at random "
                                    "weights)")
    p.add_argument("--small", action="store_true", help="the random folder at smaller widths (a CPU run)")
    p.add_argument("--concepts", nargs="+", default=["cat", "dog", "car"])
    p.add_argument("--n", type=int, help="generated images for the head and prompts per calibration split (8)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the client requests")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", action="store_true", help="keep the work folder (random model, images, server log)")
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=cmd_any_model)

    p = bsub.add_parser("gate", help="gate on vs off: wrong-concept control, benign requests, two-shape scenes")
    common(p)
    p.add_argument("--concept", default="star")
    p.add_argument("--wrong", default="moon")
    p.add_argument("--methods", nargs="+", default=["uce"], choices=("uce", "esd-x", "esd-u", "receler"))
    p.add_argument("--threshold", type=float, help="presence threshold (default: IreceConfig's)")
    p.add_argument("--t-star", type=parse_t_star, default=DEFAULTS.t_star, help="a fraction (0.3) or a step index (7)")
    p.add_argument("--tau", type=float, default=DEFAULTS.tau, help="every setting's mask threshold (the paper's too)")
    p.add_argument("--n-pairs", type=int, help="two-shape scenes (default 20; --quick 4)")
    p.add_argument("--parts", nargs="+", choices=GATE_PARTS, default=GATE_PARTS, help="which parts to run")
    p.add_argument("--gate", choices=[g for g in GATES if g != "off"], default=PRESENCE_GATE,
                   help="the presence gate on trial (head: no full defence, which needs the classifier)")
    p.add_argument("--grow", type=int, default=0, help="grow IRECE's mask by this many cells (the paper's rows: 0)")
    p.add_argument("--negative-guidance", type=float, default=0.0, metavar="G",
                   help="the gated settings steer re-noised regions away from the concept (the paper's rows: 0)")
    p.add_argument("--negative-guidance-steps", type=int, default=0, metavar="K",
                   help="... for the K steps after each re-noising only (0: to the end)")
    p.add_argument("--pairs-erased", choices=("uce", "esd-x", "esd-u", "receler"),
                   help="two-shape scenes continue after t* on a model that erased their target with this method "
                        "(default: the standard model, the strictest case)")
    p.set_defaults(func=cmd_gate)
