"""Prometheus metrics of the generation service (prometheus-client, own registry)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("irece_requests_total", "Generation requests by input modality and gRPC status code",
                                ["modality", "code"], registry=r)
        self.auth_failures = Counter("irece_auth_failures_total", "Generation calls refused for a missing or wrong "
                                     "bearer token (also counted in irece_requests_total as UNAUTHENTICATED)",
                                     registry=r)
        self.localizations = Counter("irece_localizations_total",
                                     "Requests in which IRECE localized a concept", ["concept"], registry=r)
        self.interventions = Counter("irece_interventions_total",
                                     "Requests in which IRECE's mask for a concept was non-empty", ["concept"],
                                     registry=r)
        self.suppression = Gauge("irece_suppression_ratio",
                                 "Interventions / localizations: share of localized requests in which IRECE "
                                 "re-noised part of the latent for the concept (1.0 without a presence gate)",
                                 ["concept"], registry=r)
        self.unconditioned = Counter("irece_unconditioned_total",
                                     "Requests in which an image IRECE re-noised lost its conditioning for the rest "
                                     "of the denoising (conditioning = null: a learned embedding or prompt that drew "
                                     "the concept)", registry=r)
        self.mask_area = Histogram("irece_mask_area_ratio", "Fraction of latent cells IRECE masked, per concept",
                                   ["concept"], buckets=(0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), registry=r)
        self.presence = Histogram("irece_presence_score", "Presence score of each localized concept at t* "
                                  "(classifier or contrastive gate); compare with the gate's threshold", ["concept"],
                                  buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.stage_seconds = Histogram("irece_stage_duration_seconds", "Time per request stage", ["stage"],
                                       buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                       registry=r)
        self.request_seconds = Histogram("irece_request_duration_seconds", "End-to-end request time", ["modality"],
                                         buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.queue_depth = Gauge("irece_queue_depth", "Requests admitted and waiting for a worker", registry=r)
        self.inflight = Gauge("irece_inflight_requests", "Requests generating now", registry=r)
        self.batch_size = Histogram("irece_batch_size", "Requests whose calls ran as one engine call (batched "
                                    "server; 1 = alone), by call: eps (UNet noise prediction, inversion steps "
                                    "included), concept_map / gate (IRECE's localizer), encode_text, vae_encode, "
                                    "vae_decode",
                                    ["call"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r)
        self.gpu_memory = Gauge("irece_gpu_memory_bytes", "GPU memory allocated by the server process", registry=r)

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
            done = self.localizations.labels(concept)._value.get()
            hit = self.interventions.labels(concept)._value.get()
            self.suppression.labels(concept).set(hit / done if done else 0.0)
        if report.unconditioned:
            self.unconditioned.inc()

    def observe_timings(self, timings: dict) -> None:
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
