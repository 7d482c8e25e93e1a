"""``radfed train --local``: cohort -> fingerprint and plan -> training with validation -> calibration on the
validation studies -> ONNX artifact, on one machine."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radfed.federation.learning.calibration import Calibration, calibrate, reference_fraction, reference_slices
from radfed.federation.learning.cohort import (
    ReadinessReport,
    SiteCohort,
    TrainingSample,
    cohort_from_sources,
    is_held_out,
)
from radfed.federation.learning.evaluation import evaluate_model, predict_samples
from radfed.federation.learning.export import export_artifact
from radfed.federation.learning.networks import Ensemble
from radfed.federation.learning.training import (
    TrainingLog,
    TrainingSettings,
    arrays_to_model,
    model_to_arrays,
    new_model,
    train_local,
)
from radfed.inference.errors import RadfedError
from radfed.inference.model.artifact import ModelArtifact
from radfed.inference.model.plan import ComputeBudget, Device
from radfed.inference.model.taskspec import TaskSpec, load_task_spec
from radfed.inference.pipeline.findings import ModelIdentity

# Validation studies are chosen by study hash with a salt of their own, so they never coincide with the
# federation's held-out test studies by construction (both take a share of the same hash space).
_VALIDATION_SALT = "v"


class NoTrainingDataError(RadfedError, ValueError):
    """No usable study in the given sources."""


def set_threads(threads: int) -> int:
    """Torch's intra-op threads for this process, and for the processes it starts (OpenMP); 0 picks
    :func:`free_cores`. Returns the number set. On 2 shared cores 2 threads ran ~8x slower than 1 while other
    work ran (SETUP.md), hence never more threads than free cores."""
    chosen = threads if threads > 0 else free_cores()
    torch.set_num_threads(chosen)
    os.environ["OMP_NUM_THREADS"] = str(chosen)
    return chosen


def free_cores(load: float | None = None, cpus: int | None = None) -> int:
    """The cores this process may run on (its CPU affinity) less those the 1-minute load average says are
    busy, at least 1."""
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    load = load if load is not None else os.getloadavg()[0]
    return max(1, min(cpus, cpus - round(load)))


def validation_split(
    samples: Sequence[TrainingSample], fraction: float
) -> tuple[list[TrainingSample], list[TrainingSample]]:
    """(training, validation) by study hash; at least one study each way when there are two or more."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    salted = [(s, is_held_out(_salted(s.key), fraction)) for s in samples]
    validation = [s for s, held in salted if held]
    if not validation:
        validation = [min(samples, key=lambda s: _salted(s.key))]
    if len(validation) == len(samples):
        validation = validation[:1]
    return [s for s in samples if s not in validation], validation


def _salted(key: str) -> str:
    import hashlib

    return hashlib.sha256((_VALIDATION_SALT + key).encode()).hexdigest()


def validation_dice(spec: TaskSpec, validation: Sequence[TrainingSample]) -> Callable[[torch.nn.Module], float]:
    """Mean per-study Dice on the validation studies: the score best-checkpoint selection maximises. Without
    mirroring TTA: ranking checkpoints does not need it, and it doubles the cost of every pass."""
    plain = replace(spec, inference=replace(spec.inference, mirror=False))

    def score(model: torch.nn.Module) -> float:
        return float(evaluate_model(model, validation, plain).summary()["dice"] or 0.0)

    return score


@dataclass(frozen=True)
class TrainedModel:
    """A trained network with the spec it was planned, trained and calibrated under."""

    model: torch.nn.Module
    spec: TaskSpec
    log: TrainingLog
    calibration: Calibration | None
    training_studies: int
    validation_studies: int
    member_logs: tuple[TrainingLog, ...] = ()  # one per network of an ensemble (the first is ``log``)


def fit(
    spec: TaskSpec,
    samples: Sequence[TrainingSample],
    *,
    seed: int = 0,
    steps: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainedModel:
    """Train on ``samples`` with the planned spec's recipe: validation split, best checkpoint, calibration."""
    recipe = spec.training
    # In a small cohort every study counts more for training than for choosing a checkpoint or a threshold
    # (brain set, 3 folds: 10 of 14 studies left to train on with a validation split).
    fraction = recipe.validation_fraction if len(samples) >= recipe.min_validation_cohort else 0.0
    train, validation = validation_split(samples, fraction)
    if spec.model.ensemble > 1:
        model, logs = _train_ensemble(spec, train, validation, seed=seed, steps=steps, progress=progress)
        log = logs[0]
    else:
        model, log = _train_member(spec, train, validation, seed=seed, steps=steps, progress=progress)
        logs = (log,)
    calibration = None
    if spec.outputs.min_lesion_fraction is None:  # the spec leaves it to the data
        share = reference_fraction(train, spec.outputs.min_lesion_volume_mm3) if recipe.calibrate else 0.0
        spec = spec.with_outputs(min_lesion_fraction=share)
    if spec.outputs.min_lesion_slices is None:  # likewise
        slices = reference_slices(train, spec.outputs.min_lesion_volume_mm3) if recipe.calibrate else 1
        spec = spec.with_outputs(min_lesion_slices=slices)
    if validation and recipe.calibrate:
        predictions = list(predict_samples(model, validation, spec))
        calibration = calibrate(
            predictions,
            validation,
            spec.outputs.min_lesion_volume_mm3,
            spec.outputs.lesion_fraction,
            spec.outputs.lesion_slices,
        )
        spec = calibration.applied_to(spec)
    return TrainedModel(model, spec, log, calibration, len(train), len(validation), logs)


def _train_member(
    spec: TaskSpec,
    train: Sequence[TrainingSample],
    validation: Sequence[TrainingSample],
    *,
    seed: int,
    steps: int | None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[torch.nn.Module, TrainingLog]:
    model = new_model(spec, seed=seed)
    settings = TrainingSettings.from_spec(spec, steps=steps, seed=seed)
    validate = validation_dice(spec, validation) if validation else None
    return model, train_local(model, train, spec, settings, progress=progress, validate=validate)


# Member i trains with seed + i x this: member 0 is the network a one-network recipe trains with the same seed.
_MEMBER_SEED_STRIDE = 1000


def _train_ensemble(
    spec: TaskSpec,
    train: Sequence[TrainingSample],
    validation: Sequence[TrainingSample],
    *,
    seed: int,
    steps: int | None,
    progress: Callable[[int, int, float], None] | None,
) -> tuple[torch.nn.Module, tuple[TrainingLog, ...]]:
    """The spec's networks trained side by side: member 0 here, the others each in a process of its own, the
    torch threads split between them. The recipe's time limit applies to each, so an ensemble takes one
    network's wall time; with a time limit and no step count, each network gets its share of the cores."""
    members = spec.model.ensemble
    threads = torch.get_num_threads()
    each = max(1, threads // members)
    context = multiprocessing.get_context("spawn")  # torch's thread pools do not survive fork
    with ProcessPoolExecutor(members - 1, mp_context=context) as pool:
        others = [
            pool.submit(
                _member_in_process, spec, list(train), list(validation), seed + i * _MEMBER_SEED_STRIDE, steps, each
            )
            for i in range(1, members)
        ]
        torch.set_num_threads(each)
        try:
            first, first_log = _train_member(spec, train, validation, seed=seed, steps=steps, progress=progress)
        finally:
            torch.set_num_threads(threads)
        networks, logs = [first], [first_log]
        for future in others:
            arrays, log = future.result()
            networks.append(arrays_to_model(spec, arrays))
            logs.append(log)
    return Ensemble(networks).eval(), tuple(logs)


def _member_in_process(
    spec: TaskSpec,
    train: list[TrainingSample],
    validation: list[TrainingSample],
    seed: int,
    steps: int | None,
    threads: int,
) -> tuple[list[np.ndarray], TrainingLog]:
    set_threads(threads)
    model, log = _train_member(spec, train, validation, seed=seed, steps=steps)
    return model_to_arrays(model), replace(log, optimizer_state=None)  # the optimiser's state stays here


@dataclass(frozen=True)
class LocalTrainingOutcome:
    artifact: ModelArtifact
    report: ReadinessReport
    seconds: float
    final_loss: float
    trained: TrainedModel

    def summary(self) -> str:
        r, t = self.report, self.trained
        plan = t.spec.plan
        lines = [
            f"artifact {self.artifact.key} -> {self.artifact.folder}",
            f"studies: {r.found} found, {r.usable} usable ({r.positives} positive, {r.unknown} unlabelled), "
            f"{len(r.rejected)} rejected {r.rejection_counts() or ''}",
        ]
        if plan is not None:
            lines.append(
                f"plan: {plan.network.spatial_dims}-D {plan.network.architecture.value}, spacing "
                f"{list(plan.spacing_mm)} mm, patch {list(plan.patch_size)}, batch {plan.batch_size}"
            )
        trained = f"trained {t.log.steps} steps"
        if len(t.member_logs) > 1:
            steps = "/".join(str(m.steps) for m in t.member_logs)
            trained = f"trained an ensemble of {len(t.member_logs)} networks ({steps} steps)"
        lines.append(
            f"{trained} on {t.training_studies} studies in {self.seconds:.0f} s, final loss {self.final_loss:.3f}"
        )
        if t.calibration is not None:
            c = t.calibration
            lines.append(
                f"validation ({c.studies} studies): Dice {c.validation_dice:.3f} at threshold {c.lesion_threshold}, "
                f"min volume {c.min_lesion_volume_mm3:g} mm3, min share of largest {c.min_lesion_fraction:g} "
                f"({c.reference_dice:.3f} at the spec's; best step {t.log.best_step})"
            )
        outputs = t.spec.outputs
        lines.append(
            f"lesions: min share of largest {outputs.lesion_fraction:g}, min slices {outputs.lesion_slices} "
            "(the training masks' own lesions allow them)"
        )
        return "\n".join(lines)


def train_local_artifact(
    *,
    task: str | None,
    sources: Sequence[str],
    out: Path,
    labels: Path | None = None,
    steps: int | None = None,
    threads: int | None = None,
    version: str = "0.1.0",
    cache_dir: Path | None = None,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    spec: TaskSpec | None = None,
) -> LocalTrainingOutcome:
    spec = spec or load_task_spec(task)
    if threads is not None:
        spec = replace(spec, training=replace(spec.training, threads=threads))
    threads_used = set_threads(spec.training.threads)
    started = time.perf_counter()
    budget = ComputeBudget.for_device(Device.GPU if torch.cuda.is_available() else Device.CPU)
    cohort: SiteCohort = cohort_from_sources(spec, sources, labels=labels, cache_dir=cache_dir, budget=budget)
    if not cohort.samples:
        reasons = "; ".join(r.reason for r in cohort.report.rejected[:3])
        raise NoTrainingDataError(f"no usable study in {list(sources)} ({reasons or 'nothing found'})")
    trained = fit(cohort.spec, cohort.samples, seed=seed, steps=steps, progress=progress)
    final = [x for x in trained.log.losses if np.isfinite(x)]
    fingerprint = cohort.fingerprint()
    provenance: dict[str, Any] = {
        "training": "local",
        "torch_threads": threads_used,
        "studies_per_site": {"local": cohort.report.usable},
        "readiness": cohort.report.as_metrics(),
        "steps": trained.log.steps,
        "ensemble_steps": [member.steps for member in trained.member_logs] if len(trained.member_logs) > 1 else None,
        "training_seconds": round(trained.log.seconds, 1),
        "stopped_by_time_limit": trained.log.stopped_by_time_limit,
        "validation": [[step, round(score, 4)] for step, score in trained.log.validation],
        "best_step": trained.log.best_step,
        "calibration": trained.calibration.as_dict() if trained.calibration else None,
        "fingerprint": fingerprint.as_dict() if fingerprint else None,
        "final_loss": final[-1] if final else None,
        "differential_privacy": None,
    }
    artifact = export_artifact(
        trained.model, trained.spec, out, ModelIdentity(spec.name, version), provenance=provenance
    )
    return LocalTrainingOutcome(
        artifact, cohort.report, time.perf_counter() - started, final[-1] if final else float("nan"), trained
    )
