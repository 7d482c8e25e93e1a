"""A site's view of a federated job: where its data is, its state folder, its cohort (built once per
process and cached on disk between rounds), and one round of local training."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radfed.federation.cohort import SiteCohort, cohort_from_sources
from radfed.federation.privacy import PrivacySettings, epsilon_spent, load_accountant_state, train_private
from radfed.federation.training import TrainingSettings, new_model, train_local
from radfed.inference.taskspec import TaskSpec, load_task_spec

_COHORTS: dict[str, SiteCohort] = {}


@dataclass(frozen=True)
class SiteConfig:
    """From the SuperNode's ``--node-config`` (set by the hospital's admin, never by the coordinator)."""

    name: str
    data: tuple[str, ...]  # folders and/or Orthanc URLs (credentials via environment)
    state_dir: Path
    labels: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> SiteConfig:
        data = tuple(s for s in str(node_config.get("data", "")).split(",") if s)
        if not data:
            raise ValueError("node-config 'data' (folders or Orthanc URLs, comma separated) is required")
        labels = node_config.get("labels")
        return cls(
            name=str(node_config.get("site-name", "site")),
            data=data,
            state_dir=Path(str(node_config.get("state-dir", "radfed-site-state"))),
            labels=Path(str(labels)) if labels else None,
        )

    def job_dir(self, job: str) -> Path:
        return self.state_dir / "jobs" / hashlib.sha256(job.encode()).hexdigest()[:16]


def site_cohort(site: SiteConfig, spec: TaskSpec) -> SiteCohort:
    key = json.dumps([site.data, spec.source_text])
    if key not in _COHORTS:
        _COHORTS[key] = cohort_from_sources(spec, site.data, labels=site.labels, cache_dir=site.state_dir / "cache")
    return _COHORTS[key]


def arrays_to_model(spec: TaskSpec, arrays: list[np.ndarray]) -> torch.nn.Module:
    model = new_model(spec)
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ValueError(f"received {len(arrays)} arrays for a model with {len(state)} tensors")
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(a)).to(v.dtype) for (k, v), a in zip(state.items(), arrays, strict=True)}
    )
    return model


def model_to_arrays(model: torch.nn.Module) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in model.state_dict().values()]


def train_round(
    site: SiteConfig,
    job: str,
    task: str | None,
    arrays: list[np.ndarray],
    *,
    local_steps: int,
    privacy: PrivacySettings | None,
    seed: int,
) -> tuple[list[np.ndarray], dict[str, float | int]]:
    """One round at the site: returns the updated arrays and allow-listed metrics."""
    spec = load_task_spec(task)
    cohort = site_cohort(site, spec)
    metrics: dict[str, float | int] = dict(cohort.report.as_metrics())
    if not cohort.samples:
        raise ValueError(f"site {site.name} has no usable study")
    model = arrays_to_model(spec, arrays)
    settings = TrainingSettings.from_spec(spec, seed=seed, steps_per_epoch=local_steps, epochs=1)
    if privacy is None:
        log = train_local(model, cohort.samples, spec, settings)
    else:
        log, spent = train_private(
            model, cohort.samples, spec, settings, privacy, site.job_dir(job) / "accountant.json", local_steps
        )
        metrics["epsilon"] = spent
        metrics["delta"] = privacy.delta
    finite = [x for x in log.losses if np.isfinite(x)]
    metrics.update(
        {
            "num-examples": len(cohort.samples),
            "train_loss": float(np.mean(finite[-5:])) if finite else 0.0,
            "train_steps": log.steps,
            "train_seconds": log.seconds,
        }
    )
    return model_to_arrays(model), metrics


def privacy_spent(site: SiteConfig, job: str, delta: float) -> float:
    return epsilon_spent(load_accountant_state(site.job_dir(job) / "accountant.json"), delta)
