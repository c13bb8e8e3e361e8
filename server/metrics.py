"""Prometheus metrics of the generation service (prometheus-client, own registry).

Every series whose labels come from a fixed set (modality x code, method, stage, engine call, and the concepts the
service knows) is created at zero when the service starts (`initialise`), so that the first event of each is an
increase that `rate`/`increase` see. Ratios (suppression rate, error ratio) and quantiles are not computed here:
Prometheus computes them from these counters and histograms (deploy/prometheus/rules.yml), right over any window and
across replicas.
"""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector)

from irece_runtime.calls import KINDS

MODALITIES = ("text", "embedding", "inverted_latent")  # a parsed request's input
# what a parsed request can end with; before parsing: ("none", INVALID_ARGUMENT) for a request without input and
# ("unknown", UNAUTHENTICATED) for a caller without a valid token
CODES = ("OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED",
         "UNAVAILABLE", "INTERNAL")
UNPARSED = (("none", "INVALID_ARGUMENT"), ("unknown", "UNAUTHENTICATED"))
METHODS = ("Generate", "GenerateStream")
STAGES = ("queue", "text_encoding", "inversion", "localization", "denoising", "decoding")  # Result.timings' keys
# batch sizes: buckets centred on the whole numbers (n - 0.5, n + 0.5], so a size's quantile (histogram_quantile
# interpolates inside a bucket) and Ray's bucket-midpoint sums read as whole requests, 1..16 each, then coarser
BATCH_BUCKETS = tuple(n + 0.5 for n in (*range(17), 24, 32, 48, 64))


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, gpu: bool | None = None):
        """`gpu`: export irece_gpu_memory_bytes (default: when torch sees CUDA; absent on CPU hosts)."""
        r = self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=r)  # process_* : start time (restarts), CPU, RSS, open fds
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
        self.requests = Counter("irece_requests_total", "Generation requests by input modality and gRPC status code",
                                ["modality", "code"], registry=r)
        self.auth_failures = Counter("irece_auth_failures_total", "Generation calls refused for a missing or wrong "
                                     "bearer token (also counted in irece_requests_total as UNAUTHENTICATED)",
                                     registry=r)
        self.localizations = Counter("irece_localizations_total",
                                     "Requests in which IRECE localized a concept", ["concept"], registry=r)
        self.interventions = Counter("irece_interventions_total",
                                     "Requests in which IRECE's mask for a concept was non-empty (suppression rate: "
                                     "rate of this / rate of irece_localizations_total)", ["concept"], registry=r)
        self.unconditioned = Counter("irece_unconditioned_total",
                                     "Requests in which an image IRECE re-noised lost its conditioning for the rest "
                                     "of the denoising (conditioning = null: a learned embedding or prompt that drew "
                                     "the concept)", registry=r)
        self.mask_area = Histogram("irece_mask_area_ratio", "Fraction of latent cells IRECE masked, per concept",
                                   ["concept"], buckets=(0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), registry=r)
        self.presence = Histogram("irece_presence_score", "Presence score of each localized concept at t* "
                                  "(head or classifier gate); compare with the gate's threshold", ["concept"],
                                  buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.stage_seconds = Histogram("irece_stage_duration_seconds", "Time per stage of a request that completed "
                                       "(queue: arrival to a worker)", ["stage"],
                                       buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                       registry=r)
        self.request_seconds = Histogram("irece_request_duration_seconds", "End-to-end time of every Generation "
                                         "call, from arrival to its answer, by modality, gRPC status code and method",
                                         ["modality", "code", "method"],
                                         buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.queue_depth = Gauge("irece_queue_depth", "Requests admitted and waiting for a worker", registry=r)
        self.inflight = Gauge("irece_inflight_requests", "Requests generating now", registry=r)
        self.workers = Gauge("irece_workers", "Requests this server generates at once (its worker slots)", registry=r)
        self.queue_size = Gauge("irece_queue_size", "Requests this server holds waiting beyond its workers; past "
                                "workers + queue_size it answers RESOURCE_EXHAUSTED", registry=r)
        self.batch_size = Histogram("irece_batch_size", "Requests whose calls ran as one engine call (batched "
                                    "server; 1 = alone), by call: eps (UNet noise prediction, inversion steps "
                                    "included), concept_map / concept_head (IRECE's looks), encode_text, "
                                    "vae_encode, vae_decode; buckets centred on whole numbers",
                                    ["call"], buckets=BATCH_BUCKETS, registry=r)
        if gpu is None:
            import torch
            gpu = torch.cuda.is_available()
        self.gpu_memory = (Gauge("irece_gpu_memory_bytes", "GPU memory torch has allocated in the server process",
                                 registry=r) if gpu else None)

    def initialise(self, concepts=(), histogram_concepts=()) -> None:
        """Every series of a fixed label set at zero (and the concepts' counters; `histogram_concepts` - the
        operator's - also get their mask-area and presence histograms): their first event then counts in rate()."""
        for modality in MODALITIES:
            for code in CODES:
                self.requests.labels(modality, code).inc(0)
                for method in METHODS:
                    self.request_seconds.labels(modality, code, method)
        for modality, code in UNPARSED:
            self.requests.labels(modality, code).inc(0)
            for method in METHODS:
                self.request_seconds.labels(modality, code, method)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for call in KINDS:
            self.batch_size.labels(call)
        for concept in concepts:
            self.localizations.labels(concept).inc(0)
            self.interventions.labels(concept).inc(0)
        for concept in histogram_concepts:
            self.mask_area.labels(concept)
            self.presence.labels(concept)

    def finished(self, modality: str, code: str, method: str, seconds: float) -> None:
        """One Generation call answered: counted, and its time observed whatever its code."""
        self.requests.labels(modality, code).inc()
        self.request_seconds.labels(modality, code, method).observe(seconds)

    def observe_irece(self, report) -> None:
        """Counts once per request and concept: a concept checked again later (recheck) is one localization,
        intervened if any of its checks intervened; its histograms see its largest mask and score."""
        per_concept: dict[str, list] = {}
        for c in report.concepts:
            per_concept.setdefault(c.concept, []).append(c)
        for concept, checks in per_concept.items():
            self.localizations.labels(concept).inc()
            if any(c.intervened for c in checks):
                self.interventions.labels(concept).inc()
            self.mask_area.labels(concept).observe(max(c.mask_area for c in checks))
            scores = [c.score for c in checks if c.score == c.score]  # NaN: no presence gate ran
            if scores:
                self.presence.labels(concept).observe(max(scores))
        if report.unconditioned:
            self.unconditioned.inc()

    def observe_timings(self, timings: dict) -> None:
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
