"""A site's side of a federated job: its cohort (held in memory for the job by the long-lived site worker,
and cached on disk between processes), one round of evaluation + local training, harmonisation
statistics and the rollout. Knows nothing of Flower's message types."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radfed.federation.job.planning import PLAN_CONFIG_KEY, fingerprint_metrics, planned_spec
from radfed.federation.job.run_config import RoundConfig
from radfed.federation.learning.calibration import CalibrationSums, reference_extent_kept, reference_kept
from radfed.federation.learning.cohort import SiteCohort, TrainingSample, cohort_from_sources, source_fingerprints
from radfed.federation.learning.compression import ErrorFeedback, compress_reply
from radfed.federation.learning.evaluation import (
    WITHHELD,
    EvaluationCounts,
    evaluate_model,
    evaluation_withheld,
    predict_samples,
    predictions_counts,
)
from radfed.federation.learning.membership import MembershipAudit
from radfed.federation.learning.messages import MetricValue
from radfed.federation.learning.networks import trainable_only
from radfed.federation.learning.privacy import PrivacySettings, epsilon_spent, load_accountant_state, train_private
from radfed.federation.learning.subgroup_cells import StudySubgroups
from radfed.federation.learning.subgroups import study_subgroups, subgroup_metrics
from radfed.federation.learning.training import (
    OptimizerState,
    TrainingSettings,
    arrays_to_model,
    model_to_arrays,
    train_local,
)
from radfed.federation.site.config import SiteConfig
from radfed.federation.site.membership_audit import AuditSettings, audit_model
from radfed.inference.model.plan import DatasetFingerprint
from radfed.inference.model.registry import ModelRegistry
from radfed.inference.model.taskspec import TaskSpec, load_task_spec

logger = logging.getLogger(__name__)
Metrics = dict[str, MetricValue]

_COHORTS: dict[str, SiteCohort] = {}


def site_cohort(site: SiteConfig, spec: TaskSpec, job: str, instance: str = "") -> SiteCohort:
    """The cohort, listed once per run of a job (a new run sees studies stored since); only the current run's
    stays in memory."""
    key = json.dumps([site.data, spec.source_text, job, instance])
    if key not in _COHORTS:
        _COHORTS.clear()
        _COHORTS[key] = cohort_from_sources(spec, site.data, labels=site.labels, cache_dir=site.state_dir / "cache")
    return _COHORTS[key]


class RoundPlan(RoundConfig):
    """What the coordinator asks of a site for one round: the message's config, parsed once
    (``RoundConfig``: the job's run config, the server round, the plan, the reference landmarks)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundPlan:
        return cls.from_record(config)

    @property
    def privacy(self) -> PrivacySettings | None:
        """DP-SGD for the job (None without a budget); the noise is calibrated to all rounds' steps."""
        run = self.run
        if run.epsilon <= 0:
            return None
        return PrivacySettings(
            epsilon=run.epsilon,
            delta=run.delta,
            max_grad_norm=run.max_grad_norm,
            planned_steps=run.num_server_rounds * run.local_steps,
            trainable=run.trainable,
        )


def _cohort_split(
    site: SiteConfig, plan: RoundPlan
) -> tuple[TaskSpec, SiteCohort, list[TrainingSample], list[TrainingSample]]:
    spec = job_spec(plan)
    cohort = site_cohort(site, spec, plan.run.job, plan.job_instance)
    if not cohort.entries:
        raise ValueError(f"site {site.name} has no usable study")
    train, held_out = cohort.split(plan.run.held_out_fraction, plan.harmonisation)
    return spec, cohort, train, held_out


def job_spec(plan: RoundPlan) -> TaskSpec:
    """The job's task spec with the coordinator's plan."""
    return planned_spec(load_task_spec(plan.run.task or None), {PLAN_CONFIG_KEY: plan.plan or ""})


def train_round(site: SiteConfig, plan: RoundPlan, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], Metrics]:
    """One round at the site: evaluate the incoming global model on the held-out studies, then train it on
    the rest; returns the updated arrays (with the job's ``compression``: the compressed update) and
    allow-listed metrics. Asked again for the round it trained last, from the same global model (a
    coordinator that restarted and resumed from its checkpoint), the site sends the same reply again instead
    of training twice: training again would spend privacy budget a second time for one round."""
    run_dir = site.run_dir(plan.run.job, plan.job_instance)
    incoming = arrays_digest(arrays)
    replay = load_round_reply(run_dir, plan.server_round, incoming)
    if replay is not None:
        return replay[0], replay[1] | {"round_replayed": 1}
    updated, metrics = _train_round(site, plan, arrays)
    # Compressed after training, so after DP-SGD's noise: post-processing of a private update costs no
    # privacy. The stored reply is the compressed one, so a replay sends the same bytes and leaves top-k's
    # residual alone.
    reply = compress_reply(
        plan.run.update_compression, arrays, updated, ErrorFeedback(run_dir), server_round=plan.server_round
    )
    save_round_reply(run_dir, plan.server_round, incoming, reply, metrics)
    return reply, metrics


ROUND_REPLY = "last-round.npz"
ACCOUNTANT = "accountant.json"  # per job name, across its runs (SiteConfig.job_dir)


def arrays_digest(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(str((a.dtype.str, a.shape)).encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def load_round_reply(job_dir: Path, server_round: int, incoming: str) -> tuple[list[np.ndarray], Metrics] | None:
    path = job_dir / ROUND_REPLY
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as stored:
        header = json.loads(str(stored["header"]))
        if header["round"] != server_round or header["incoming"] != incoming:
            return None
        return [stored[f"arr_{i}"] for i in range(header["arrays"])], header["metrics"]


def save_round_reply(
    job_dir: Path, server_round: int, incoming: str, arrays: list[np.ndarray], metrics: Metrics
) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"round": server_round, "incoming": incoming, "arrays": len(arrays), "metrics": metrics})
    partial = job_dir / (ROUND_REPLY + ".partial.npz")
    np.savez(partial, *arrays, header=np.asarray(header))
    partial.replace(job_dir / ROUND_REPLY)


def _train_round(site: SiteConfig, plan: RoundPlan, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], Metrics]:
    spec, cohort, train, held_out = _cohort_split(site, plan)
    if plan.server_round == 1 and plan.run.base_model and plan.run.membership_audit is MembershipAudit.LIRA:
        save_starting_model(site.run_dir(plan.run.job, plan.job_instance), arrays)
    metrics: Metrics = dict(cohort.report.as_metrics())
    model = arrays_to_model(spec, arrays)
    evaluation_started = time.perf_counter()
    run = plan.run
    if evaluation_withheld(len(held_out), run.evaluation_min_studies):
        metrics[WITHHELD] = 1  # figures it may not send: no pass of the model over those studies
    else:
        metrics.update(evaluate_model(model, held_out, spec, site.arbiter()).as_metrics())
    metrics["evaluation_seconds"] = time.perf_counter() - evaluation_started
    # learning-rate 0: the recipe's
    recipe = replace(spec.training, learning_rate=run.learning_rate) if run.learning_rate else spec.training
    settings = TrainingSettings.from_spec(
        spec,
        recipe=recipe,
        seed=plan.server_round,
        steps=run.local_steps,
        proximal_mu=run.proximal_mu,
        # the recipe's schedule runs over the whole job: this round is one slice of it
        schedule_offset=(plan.server_round - 1) * run.local_steps,
        schedule_total=run.num_server_rounds * run.local_steps,
    )
    run_dir = site.run_dir(run.job, plan.job_instance)
    state = load_optimizer_state(run_dir)
    privacy = plan.privacy
    arbiter = site.arbiter()
    if privacy is None:
        with trainable_only(model, run.trainable):
            log = train_local(model, train, spec, settings, optimizer_state=state, arbiter=arbiter)
    else:
        accountant = site.job_dir(run.job) / ACCOUNTANT
        log, spent = train_private(model, train, spec, settings, privacy, accountant, run.local_steps, state, arbiter)
        metrics["epsilon"] = spent
        metrics["delta"] = privacy.delta
    save_optimizer_state(run_dir, log.optimizer_state)
    metrics["train_paused_seconds"] = log.paused_seconds
    if spec.outputs.min_lesion_fraction is None:  # the spec leaves the share-of-largest rule to the data
        kept, studies = reference_kept(train, spec.outputs.min_lesion_volume_mm3)
        metrics["lesion_kept"], metrics["lesion_kept_studies"] = kept, studies
    if spec.outputs.min_lesion_slices is None:  # and the minimum slice extent
        metrics["lesion_extent_kept_mm3"], metrics["lesion_extent_total_mm3"] = reference_extent_kept(
            train, spec.outputs.min_lesion_volume_mm3
        )
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


STARTING_MODEL = "starting-model.npz"


def save_starting_model(job_dir: Path, arrays: list[np.ndarray]) -> None:
    """Round 1's global model of a job that fine-tunes a base model, kept with ``membership-audit = lira``: the
    audit's reference models start from it, as the job's model did."""
    job_dir.mkdir(parents=True, exist_ok=True)
    partial = job_dir / (STARTING_MODEL + ".partial.npz")
    np.savez(partial, *arrays)
    partial.replace(job_dir / STARTING_MODEL)


def load_starting_model(job_dir: Path) -> list[np.ndarray] | None:
    path = job_dir / STARTING_MODEL
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]


OPTIMIZER_STATE = "optimizer.pt"


def load_optimizer_state(job_dir: Path) -> OptimizerState | None:
    """The site's optimiser state from its previous round of this job. Restarting Adam every round threw
    away its moment estimates each time: in one run on 3 x 12 small synthetic studies, 30 steps per round,
    pooled held-out Dice was 0.00 after 4 rounds with a fresh optimiser and 0.80 after 3 with the state kept."""
    path = job_dir / OPTIMIZER_STATE
    if not path.exists():
        return None
    state: OptimizerState = torch.load(path, weights_only=True)
    return state


def save_optimizer_state(job_dir: Path, state: OptimizerState | None) -> None:
    if state is None:
        return
    job_dir.mkdir(parents=True, exist_ok=True)
    partial = job_dir / (OPTIMIZER_STATE + ".partial")
    torch.save(state, partial)
    partial.replace(job_dir / OPTIMIZER_STATE)


def evaluate_round(site: SiteConfig, plan: RoundPlan, arrays: list[np.ndarray]) -> Metrics:
    """Evaluate the final global model on the site's held-out studies: the job's last message to a site. Under
    the lesion rules the coordinator fixed for the artifact; with the recipe's ``calibrate``, the site also
    sends its held-out studies' Dice per output setting, summed (the coordinator chooses the artifact's
    threshold and minimum size from every site's). With ``membership-audit``, the site then attacks the model
    on its training vs held-out studies (its AUC and TPR at 1 % FPR join the metrics)."""
    spec, cohort, train, held_out = _cohort_split(site, plan)
    fixed = {"min_lesion_fraction": plan.lesion_fraction, "min_lesion_slices": plan.lesion_slices}
    spec = spec.with_outputs(**{name: value for name, value in fixed.items() if value is not None})
    model = arrays_to_model(spec, arrays)
    metrics: Metrics = dict(cohort.report.as_metrics())
    predictions = list(predict_samples(model, held_out, spec, site.arbiter()))
    studies = list(predictions_counts(held_out, predictions, spec))
    run = plan.run
    if spec.training.calibrate and held_out:
        outputs = spec.outputs
        sums = CalibrationSums.of(
            predictions, held_out, outputs.min_lesion_volume_mm3, outputs.lesion_fraction, outputs.lesion_slices
        ).shareable(run.calibration_min_studies)
        if sums is None:
            logger.warning(
                "output calibration: %d held-out studies, fewer than calibration-min-studies (%d): sums not sent",
                len(held_out),
                run.calibration_min_studies,
            )
            metrics["calibration_withheld"] = 1
        else:
            metrics.update(sums.as_metrics())
    del predictions
    evaluation = sum((counts for _, counts in studies), EvaluationCounts()).shareable(run.evaluation_min_studies)
    if WITHHELD in evaluation:
        logger.warning(
            "evaluation: %d held-out studies, fewer than evaluation-min-studies (%d): figures not sent",
            len(held_out),
            run.evaluation_min_studies,
        )
    metrics.update(evaluation)
    # bias checks: per subgroup read from the studies' headers, only cells of >= bias-min-cell studies
    groups = study_subgroups(site.data, {sample.key for sample, _ in studies})
    cells = [(counts, groups.get(sample.key, StudySubgroups())) for sample, counts in studies]
    metrics.update(subgroup_metrics(cells, run.bias_min_cell))
    attack, starting = run.membership_audit, None
    if run.base_model and attack is MembershipAudit.LIRA:
        starting = load_starting_model(site.run_dir(run.job, plan.job_instance))
        if starting is None:
            # Not asked in round 1 (sites-per-round): references from random weights, at a fine-tuning learning
            # rate, would be barely trained and LiRA's figure meaningless, so the site sends the loss attack only.
            logger.warning("LiRA skipped: this site did not train in round 1 and has no starting model of the job")
            attack = MembershipAudit.LOSS
    audit = AuditSettings(
        attack,
        run.membership_references,
        run.reference_steps,
        run.learning_rate,
        run.seed,
        initial=starting,
    )
    metrics.update(audit_model(model, train, held_out, spec, audit, site.arbiter()))
    return metrics


def intensity_landmarks(site: SiteConfig, plan: RoundPlan) -> Metrics:
    """The site's share of federated harmonisation: mean landmarks per channel over its training studies."""
    held_out_fraction = plan.run.held_out_fraction
    spec = job_spec(plan)
    cohort = site_cohort(site, spec, plan.run.job, plan.job_instance)
    if not cohort.entries:
        raise ValueError(f"site {site.name} has no usable study")
    metrics: Metrics = {f"landmarks.{k}": v for k, v in cohort.channel_landmarks(held_out_fraction).items()}
    metrics["landmark_studies"] = len(cohort.split(held_out_fraction)[0])
    return metrics


def site_fingerprint(site: SiteConfig, plan: RoundPlan) -> Metrics:
    """The site's share of the job's plan: its dataset fingerprint as aggregate statistics."""
    spec = load_task_spec(plan.run.task or None)
    prints = source_fingerprints(spec, site.data, site.labels)
    if not prints:
        raise ValueError(f"site {site.name} has no usable study")
    return fingerprint_metrics(DatasetFingerprint.from_studies(prints))


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
    return epsilon_spent(load_accountant_state(site.job_dir(job) / ACCOUNTANT), delta)
