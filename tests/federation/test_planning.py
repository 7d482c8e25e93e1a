"""The job's plan in a federation: fixed from the sites' fingerprint summaries, which pass the allow-list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radfed.federation.job.planning import (
    fingerprint_from_metrics,
    fingerprint_metrics,
    job_plan,
    needs_fingerprint,
    planned_spec,
)
from radfed.federation.learning.cohort import source_fingerprints
from radfed.federation.learning.messages import MetricLeakError, allowed_metrics
from radfed.inference.model.plan import PRIVATE_MIN_BATCH, DatasetFingerprint, PlanError
from radfed.inference.model.taskspec import load_task_spec


def test_sites_fingerprints_travel_as_allowed_aggregates_and_plan_one_network(synth_root: Path) -> None:
    spec = load_task_spec()
    assert needs_fingerprint(spec)
    with pytest.raises(PlanError, match="fingerprint"):
        job_plan(spec)
    sites = {}
    for site in ("site-1", "site-2"):
        fingerprint = DatasetFingerprint.from_studies(source_fingerprints(spec, [str(synth_root / site)], None))
        metrics = allowed_metrics(fingerprint_metrics(fingerprint))  # what a site may send
        sites[site] = fingerprint_from_metrics(metrics)
        assert sites[site].studies == 3 and set(sites[site].channels) == {"t2w", "adc", "dwi"}
    plan = job_plan(spec, sites)
    # every site builds the same network from the plan in the round's config
    config = {"plan": plan.to_json()}
    assert planned_spec(spec, config).plan == plan == planned_spec(spec, dict(config)).plan
    # a differentially private job plans batches DP-SGD can use
    assert job_plan(spec, sites, private=True).batch_size >= PRIVATE_MIN_BATCH


def test_a_per_study_vector_is_not_a_fingerprint() -> None:
    with pytest.raises(MetricLeakError):
        allowed_metrics({"fingerprint.shape": [24.0, 128.0, 128.0, 1.0]})  # wrong length: not the shape triple
    with pytest.raises(MetricLeakError):
        allowed_metrics({"fingerprint.study-0001": list(np.zeros(3))})


def test_a_spec_that_fixes_the_grid_needs_no_fingerprint() -> None:
    spec = load_task_spec("prostate_bpmri_highgrade")
    assert not needs_fingerprint(spec)
    assert planned_spec(spec, {}).patch_size == (12, 64, 64)
