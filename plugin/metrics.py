"""Prometheus metrics of the node (its own registry, so tests and several nodes never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("fetch", "load", "preprocess", "model", "postprocess", "encode", "qa", "store", "total")


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "radfed_stage_seconds",
            "Seconds per pipeline stage of a job",
            ["stage"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.jobs = Counter(
            "radfed_jobs_total",
            "Jobs finished, by state and failure kind",
            ["state", "failure_kind"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "radfed_queue_depth", "Jobs queued plus studies waiting in the inbox", registry=self.registry
        )
        self.model_loaded = Gauge("radfed_model_loaded", "1 when a model is active and loaded", registry=self.registry)
        self.prefetch = Counter(
            "radfed_prefetch_total",
            "Jobs by what they found prepared ahead (used, stale, missed)",
            ["outcome"],
            registry=self.registry,
        )
        self.prepared_ahead = Counter(
            "radfed_prepared_ahead_total",
            "Studies prepared before StableStudy, by whether preparing succeeded",
            ["ok"],
            registry=self.registry,
        )
        self.orthanc_up = Gauge("radfed_orthanc_up", "1 when Orthanc answered the last request", registry=self.registry)
        self.ready = Gauge("radfed_ready", "1 when /ready last said ready", registry=self.registry)
        self.loop_healthy = Gauge(
            "radfed_loop_healthy", "1 when the loop goes round (0: failing, stalled or stopped)", ["loop"],
            registry=self.registry,
        )  # fmt: skip
