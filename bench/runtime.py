"""ONNX Runtime throughput of the default task's network on this machine: sliding windows per second with one
window per run against several (the node's ``[inference] batch_windows``), a full study's sliding-window prediction
(mirroring TTA as the task says) at each, and the float16 copy's difference from float32.

The network is the one the default task plans on a small synthetic site, untrained (speed does not depend on the
weights); the study is a full-size synthetic one through the node's preprocessing. The device is the node's
default (``auto``): the first line says which provider ran and why, so the same command measures a GPU node.
Float16 runs only on a GPU provider (``fp16 = true``); on the CPU only its difference is shown."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import table
from radfed.federation.learning.cohort import cohort_from_sources
from radfed.federation.learning.export import export_artifact
from radfed.federation.learning.networks import build_network
from radfed.inference.dicom.study_source import FolderStudy
from radfed.inference.model.artifact import ModelArtifact
from radfed.inference.model.device import RuntimeSettings, probe_device
from radfed.inference.model.runtime import OnnxModel
from radfed.inference.model.taskspec import load_task_spec
from radfed.inference.pipeline.findings import ModelIdentity
from radfed.inference.pipeline.preprocess import load_study, prepare
from radfed.inference.testing.synthetic.writer import synthesize_to_folder

SECONDS = float(os.environ.get("RADFED_BENCH_RUNTIME_S", "8"))  # model runs timed per row
BATCHES = tuple(int(b) for b in os.environ.get("RADFED_BENCH_RUNTIME_BATCHES", "1,2,4,8").split(","))
STUDY_REPEATS = int(os.environ.get("RADFED_BENCH_RUNTIME_STUDIES", "2"))  # whole-study predictions per row


def _artifact(root: Path) -> ModelArtifact:
    synthesize_to_folder(root / "plan", sites=1, studies_per_site=3, seed=1, small=True)
    spec = cohort_from_sources(load_task_spec(), [str(root / "plan")]).spec
    assert spec.plan is not None
    torch.manual_seed(0)
    network = build_network(spec.plan.network, len(spec.channels))
    return export_artifact(network, spec, root / "artifact", ModelIdentity("bench-runtime", "0"), fp16=True)


def _windows_per_s(model: OnnxModel, batch: int) -> float:
    rng = np.random.default_rng(0)
    windows = rng.standard_normal((batch, len(model.artifact.spec.channels), *model.patch)).astype(np.float32)
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < SECONDS:
        model.run_batch(windows)
        runs += 1
    return runs * batch / (time.perf_counter() - started)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        artifact = _artifact(root)
        study_dir = synthesize_to_folder(root / "study", sites=1, studies_per_site=1, seed=31)[0]
        study = next(p for p in study_dir.iterdir() if p.is_dir())
        image = prepare(load_study(FolderStudy(study), artifact.spec), artifact.spec).image
        device = probe_device(RuntimeSettings())
        rows = []
        for batch in BATCHES:
            model = OnnxModel(artifact, RuntimeSettings(batch_windows=batch), device=device)
            per_s = _windows_per_s(model, batch)
            times = []
            for _ in range(STUDY_REPEATS):
                started = time.perf_counter()
                prediction = model.predict(image)
                times.append(time.perf_counter() - started)
            rows.append([batch, f"{per_s:.1f}", f"{statistics.median(times):.2f}", prediction.windows])
        base = float(str(rows[0][1]))
        for row in rows:
            row.insert(2, f"{float(str(row[1])) / base:.2f}")
    half = artifact.provenance["onnx_fp16_max_abs_error"]
    print(f"\ndevice: {device.provider} ({device.reason})")
    print(f"float16 copy: max |float32 - float16| logit difference {half:.4f} on a random sample (tolerance 0.05)")
    table(
        f"ONNX Runtime, {model.provider}, float32: windows per second by windows per run; patch "
        f"{'x'.join(map(str, artifact.spec.patch_size))}, {len(artifact.spec.channels)} channels; one study "
        f"{'x'.join(map(str, image.shape[1:]))} on the model grid, mirroring as the task says",
        ["windows per run", "windows/s", "vs 1", "study prediction (s, median)", "windows per study"],
        rows,
        "nice .venv/bin/python -m bench runtime  (RADFED_BENCH_RUNTIME_S, RADFED_BENCH_RUNTIME_BATCHES)",
    )
