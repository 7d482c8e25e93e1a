"""``radfed train --local``: cohort -> training -> ONNX artifact, on one machine."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from radfed.federation.cohort import ReadinessReport, cohort_from_sources
from radfed.federation.export import export_artifact
from radfed.federation.training import TrainingSettings, new_model, train_local
from radfed.inference.artifact import ModelArtifact
from radfed.inference.errors import RadfedError
from radfed.inference.findings import ModelIdentity
from radfed.inference.taskspec import load_task_spec


class NoTrainingDataError(RadfedError, ValueError):
    """No usable study in the given sources."""


@dataclass(frozen=True)
class LocalTrainingOutcome:
    artifact: ModelArtifact
    report: ReadinessReport
    seconds: float
    final_loss: float

    def summary(self) -> str:
        r = self.report
        return (
            f"artifact {self.artifact.key} -> {self.artifact.folder}\n"
            f"studies: {r.found} found, {r.usable} usable ({r.positives} positive), {len(r.rejected)} rejected "
            f"{r.rejection_counts() or ''}\n"
            f"trained in {self.seconds:.0f} s, final loss {self.final_loss:.3f}"
        )


def train_local_artifact(
    *,
    task: str | None,
    sources: Sequence[str],
    out: Path,
    labels: Path | None = None,
    epochs: int | None = None,
    version: str = "0.1.0",
    cache_dir: Path | None = None,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> LocalTrainingOutcome:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = load_task_spec(task)
    started = time.perf_counter()
    cohort = cohort_from_sources(spec, sources, labels=labels, cache_dir=cache_dir)
    if not cohort.samples:
        reasons = "; ".join(r.reason for r in cohort.report.rejected[:3])
        raise NoTrainingDataError(f"no usable study in {list(sources)} ({reasons or 'nothing found'})")
    model = new_model(spec, seed=seed)
    settings = TrainingSettings.from_spec(spec, epochs=epochs, seed=seed)
    log = train_local(model, cohort.samples, spec, settings, progress=progress)
    provenance = {
        "training": "local",
        "studies_per_site": {"local": cohort.report.usable},
        "readiness": cohort.report.as_metrics(),
        "epochs": settings.epochs,
        "steps": log.steps,
        "final_loss": log.losses[-1],
        "differential_privacy": None,
    }
    artifact = export_artifact(model, spec, out, ModelIdentity(spec.name, version), provenance=provenance)
    return LocalTrainingOutcome(artifact, cohort.report, time.perf_counter() - started, log.losses[-1])
