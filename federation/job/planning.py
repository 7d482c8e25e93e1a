"""The plan of a federated job: fixed by the coordinator before round 1 from the sites' fingerprint summaries
(spacing medians and percentiles, median shape, pooled foreground intensity statistics: aggregates, never an
image or a per-study value), sent to every site in each round's config and recorded in the artifact."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from radfed.federation.learning.messages import FINGERPRINT_PREFIX, MetricValue
from radfed.inference.model.plan import ChannelStatistics, DatasetFingerprint, Plan, derive_plan
from radfed.inference.model.taskspec import TaskSpec

PLAN_CONFIG_KEY = "plan"  # the plan's JSON in a round's config


def needs_fingerprint(spec: TaskSpec) -> bool:
    """Whether the spec leaves a data-dependent part of the plan open (grid, patch or CT statistics)."""
    pre = spec.preprocessing
    ct = any(c.modality.upper() == "CT" for c in spec.channels) and pre.normalization is None
    return pre.spacing_mm is None or pre.patch_size is None or ct


def fingerprint_metrics(fingerprint: DatasetFingerprint) -> dict[str, MetricValue]:
    """A site's fingerprint as allow-listed metrics (see learning.messages.FINGERPRINT_PREFIX)."""
    metrics: dict[str, MetricValue] = {
        "fingerprint_studies": fingerprint.studies,
        FINGERPRINT_PREFIX + "spacing": list(fingerprint.median_spacing_mm),
        FINGERPRINT_PREFIX + "low_spacing": list(fingerprint.low_spacing_mm),
        FINGERPRINT_PREFIX + "shape": [float(v) for v in fingerprint.median_shape],
    }
    for name, stats in fingerprint.channels.items():
        metrics[f"{FINGERPRINT_PREFIX}channel.{name}"] = [
            float(stats.voxels),
            stats.mean,
            stats.std,
            stats.percentile_00_5,
            stats.percentile_99_5,
        ]
    return metrics


def fingerprint_from_metrics(metrics: Mapping[str, Any]) -> DatasetFingerprint:
    channel_prefix = FINGERPRINT_PREFIX + "channel."
    channels = {
        key.removeprefix(channel_prefix): ChannelStatistics(
            int(v[0]), float(v[1]), float(v[2]), float(v[3]), float(v[4])
        )
        for key, v in metrics.items()
        if key.startswith(channel_prefix)
    }
    spacing, low, shape = (metrics[FINGERPRINT_PREFIX + k] for k in ("spacing", "low_spacing", "shape"))
    return DatasetFingerprint(
        studies=int(metrics["fingerprint_studies"]),
        median_spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        low_spacing_mm=(float(low[0]), float(low[1]), float(low[2])),
        median_shape=(round(shape[0]), round(shape[1]), round(shape[2])),
        channels=channels,
    )


def job_plan(
    spec: TaskSpec, site_fingerprints: Mapping[str, DatasetFingerprint] | None = None, *, private: bool = False
) -> Plan:
    """The job's plan from the spec and (where it needs them) the sites' merged fingerprints; ``private``:
    the job trains with differential privacy."""
    merged = DatasetFingerprint.merge(list(site_fingerprints.values())) if site_fingerprints else None
    return derive_plan(spec.plan_overrides(), merged, private=private)


def planned_spec(spec: TaskSpec, config: Mapping[str, Any]) -> TaskSpec:
    """The spec with the job's plan from a round's config (or, for a spec that fixes every data-dependent
    part, the plan derived from the spec alone)."""
    text = config.get(PLAN_CONFIG_KEY)
    if text:
        return spec.planned(Plan.from_json(str(text)))
    return spec.planned(job_plan(spec))
