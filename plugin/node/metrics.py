"""Prometheus metrics of the node (its own registry, so tests and several nodes never collide)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from radfed.federation.job.alerts import AlertStore
from radfed.federation.learning.aggregation import AnomalyRule

STAGES = ("fetch", "load", "preprocess", "model", "postprocess", "encode", "qa", "store", "total")


class AlertCollector(Collector):
    """Poisoning alerts, read from the node's alert store at each scrape: the site worker (another process)
    writes it, and the store only grows, so its count is a counter that survives the node's restarts."""

    def __init__(self, store: AlertStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        alerts = self.store.alerts()
        received = CounterMetricFamily(
            "radfed_federation_alerts", "Poisoning alerts received from federated jobs, by rule", labels=["rule"]
        )
        for rule in AnomalyRule:
            received.add_metric([rule.value], sum(a.alert.rule is rule for a in alerts))
        yield received
        yield GaugeMetricFamily(
            "radfed_federation_alerts_unresolved",
            "Poisoning alerts the node's admin has not resolved",
            value=sum(a.resolved_at is None for a in alerts),
        )


class NodeMetrics:
    def __init__(self, alerts: AlertStore | None = None) -> None:
        self.registry = CollectorRegistry()
        if alerts is not None:
            self.registry.register(AlertCollector(alerts))
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
