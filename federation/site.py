"""A site's view of a federated job: where its data is, its state folder, its cohort (built once per
process and cached on disk between rounds), and one round of local training."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np
import torch

from radfed.federation.cohort import SiteCohort, TrainingSample, cohort_from_sources
from radfed.federation.evaluation import evaluate_model
from radfed.federation.messages import MetricValue
from radfed.federation.privacy import PrivacySettings, epsilon_spent, load_accountant_state, train_private
from radfed.federation.training import TrainingSettings, new_model, train_local
from radfed.inference.registry import ModelRegistry
from radfed.inference.taskspec import TaskSpec, load_task_spec

Metrics = dict[str, MetricValue]

_COHORTS: dict[str, SiteCohort] = {}


@dataclass(frozen=True)
class SiteConfig:
    """From the SuperNode's ``--node-config`` (set by the hospital's admin, never by the coordinator)."""

    name: str
    data: tuple[str, ...] = field(repr=False)  # folders and/or Orthanc URLs (the password is injected: never print)
    state_dir: Path
    labels: Path | None = None
    models_dir: Path | None = None  # the node's model registry, where a rolled-out model is stored

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> SiteConfig:
        password = os.environ.get("RADFED_ORTHANC_PASSWORD", "")
        data = tuple(_with_password(s, password) for s in str(node_config.get("data", "")).split(",") if s)
        if not data:
            raise ValueError("node-config 'data' (folders or Orthanc URLs, comma separated) is required")
        labels = node_config.get("labels")
        models = node_config.get("models-dir")
        return cls(
            name=str(node_config.get("site-name", "site")),
            data=data,
            state_dir=Path(str(node_config.get("state-dir", "radfed-site-state"))),
            labels=Path(str(labels)) if labels else None,
            models_dir=Path(str(models)) if models else None,
        )

    def job_dir(self, job: str) -> Path:
        return self.state_dir / "jobs" / hashlib.sha256(job.encode()).hexdigest()[:16]


def _with_password(source: str, password: str) -> str:
    """Orthanc URLs in the node config carry the user only; the password comes from the environment
    (RADFED_ORTHANC_PASSWORD) so that it never appears in Flower's configuration or logs."""
    parts = urlsplit(source)
    if not password or parts.scheme not in ("http", "https") or not parts.username or parts.password:
        return source
    netloc = f"{parts.username}:{quote(password, safe='')}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


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


@dataclass(frozen=True)
class RoundPlan:
    """What the coordinator asks of a site for one round (from the message's config)."""

    job: str
    task: str | None
    local_steps: int
    seed: int
    privacy: PrivacySettings | None = None
    harmonisation: dict[str, list[float]] | None = None
    proximal_mu: float = 0.0
    held_out_fraction: float = 0.25


def _cohort_split(
    site: SiteConfig, plan: RoundPlan
) -> tuple[TaskSpec, SiteCohort, list[TrainingSample], list[TrainingSample]]:
    spec = load_task_spec(plan.task)
    cohort = site_cohort(site, spec)
    if not cohort.entries:
        raise ValueError(f"site {site.name} has no usable study")
    train, held_out = cohort.split(plan.held_out_fraction, plan.harmonisation)
    return spec, cohort, train, held_out


def train_round(site: SiteConfig, plan: RoundPlan, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], Metrics]:
    """One round at the site: evaluate the incoming global model on the held-out studies, then train it on
    the rest; returns the updated arrays and allow-listed metrics."""
    spec, cohort, train, held_out = _cohort_split(site, plan)
    metrics: Metrics = dict(cohort.report.as_metrics())
    model = arrays_to_model(spec, arrays)
    evaluation_started = time.perf_counter()
    metrics.update(evaluate_model(model, held_out, spec).as_metrics())
    metrics["eval_seconds"] = time.perf_counter() - evaluation_started
    settings = TrainingSettings.from_spec(
        spec, seed=plan.seed, steps_per_epoch=plan.local_steps, epochs=1, proximal_mu=plan.proximal_mu
    )
    if plan.privacy is None:
        log = train_local(model, train, spec, settings)
    else:
        log, spent = train_private(
            model, train, spec, settings, plan.privacy, site.job_dir(plan.job) / "accountant.json", plan.local_steps
        )
        metrics["epsilon"] = spent
        metrics["delta"] = plan.privacy.delta
    finite = [x for x in log.losses if np.isfinite(x)]
    metrics.update(
        {
            "num-examples": len(train),
            "train_loss": float(np.mean(finite[-5:])) if finite else 0.0,
            "train_steps": log.steps,
            "train_seconds": log.seconds,
        }
    )
    return model_to_arrays(model), metrics


def evaluate_round(site: SiteConfig, plan: RoundPlan, arrays: list[np.ndarray]) -> Metrics:
    """Evaluate the (final) global model on the site's held-out studies."""
    spec, cohort, _, held_out = _cohort_split(site, plan)
    metrics: Metrics = dict(cohort.report.as_metrics())
    metrics.update(evaluate_model(arrays_to_model(spec, arrays), held_out, spec).as_metrics())
    return metrics


def intensity_landmarks(site: SiteConfig, task: str | None, held_out_fraction: float) -> Metrics:
    """The site's share of federated harmonisation: mean landmarks per channel over its training studies."""
    spec = load_task_spec(task)
    cohort = site_cohort(site, spec)
    if not cohort.entries:
        raise ValueError(f"site {site.name} has no usable study")
    metrics: Metrics = {f"landmarks.{k}": v for k, v in cohort.channel_landmarks(held_out_fraction).items()}
    metrics["landmark_studies"] = len(cohort.split(held_out_fraction)[0])
    return metrics


def install_rollout(site: SiteConfig, files: dict[str, bytes]) -> str:
    """Store the federation's final artifact in this node's model registry (verified; the admin or the
    operator activates it). Returns the installed model's key."""
    if site.models_dir is None:
        raise ValueError(f"site {site.name} has no models-dir in its node config: cannot store the model")
    incoming = site.state_dir / "rollout"
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True)
    for name, content in files.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"refusing artifact file name {name!r}")
        (incoming / name).write_bytes(content)
    return ModelRegistry(site.models_dir).install(incoming).key


def privacy_spent(site: SiteConfig, job: str, delta: float) -> float:
    return epsilon_spent(load_accountant_state(site.job_dir(job) / "accountant.json"), delta)
