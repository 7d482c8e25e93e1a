"""End-to-end node benchmark on the default task: StableStudy -> SEG + SR stored, split by stage,
against model-only time on the same tensors, and studies per hour at the default concurrency.

A real Orthanc and the node's own service (in this process, default concurrency 2) process full-size
synthetic studies (3 x 24 x 256 x 256 at site 1; other sites' grids differ). StableStudy times are taken
from Orthanc's /changes by a poller with 0.1 s resolution. A second table times the same node while a site's
federated round trains beside it (``bench.node_training``), with the device arbiter off and on."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.node_training import run_beside_training, training_rows
from bench.node_workers import workers_table
from bench.report import table
from bench.running_node import running_node
from radfed.federation.learning.train_local import train_local_artifact
from radfed.inference.dicom.study_source import OrthancStudy
from radfed.inference.model.arbiter import DevicePolicy
from radfed.inference.model.artifact import load_artifact
from radfed.inference.pipeline.preprocess import load_study, prepare
from radfed.inference.testing.synthetic.sites import site_profile
from radfed.inference.testing.synthetic.study import SyntheticStudy, render_study
from radfed.inference.testing.synthetic.writer import synthesize_to_folder, upload_study
from radfed.plugin.node.ledger.store import JobStatus

STUDIES = int(os.environ.get("RADFED_BENCH_STUDIES", "12"))  # the batch (throughput)
SEQUENTIAL = int(os.environ.get("RADFED_BENCH_SEQUENTIAL", "10"))  # one at a time (latency, no queueing)
MODEL_STEPS = int(os.environ.get("RADFED_BENCH_MODEL_STEPS", "200"))  # the served model's training (fewer: a smoke run)
STAGES = (
    "ahead_load",
    "ahead_preprocess",
    "fetch",
    "load",
    "preprocess",
    "model",
    "postprocess",
    "encode",
    "qa",
    "store",
)


@dataclass
class NodeRun:
    stages: dict[str, float]
    job_total: float
    e2e: float
    model_only: float
    per_hour: float
    batch: int
    prepared_ahead: int
    lesions: float
    provider: str
    concurrency: int


def run_node(root: Path, artifact_dir: Path, studies: list[SyntheticStudy], prefetch: bool) -> NodeRun:
    """Latency (studies sent one at a time) and throughput (a batch) of one node with a fresh Orthanc."""
    artifact = load_artifact(artifact_dir)
    with running_node(root, artifact_dir, "ahead" if prefetch else "plain", prefetch=prefetch) as node:
        sequential = node.one_at_a_time(studies[:SEQUENTIAL])
        # Throughput: the batch uploaded at once.
        batch_start = time.time()
        for study in studies[SEQUENTIAL:]:
            upload_study(study, node.client)
        node.wait_for(SEQUENTIAL + STUDIES)
        jobs = [j for j in node.service.ledger.jobs(state=JobStatus.DONE, limit=1000) if j.created >= batch_start]
        model = node.service.model
        assert model is not None
        # Model-only time on the same tensors, one study at a time, in this process.
        model_only = []
        for job in sequential:
            source = OrthancStudy(node.client, job.orthanc_study_id)
            prepared = prepare(load_study(source, artifact.spec), artifact.spec)
            started = time.perf_counter()
            model.predict(prepared.image)
            model_only.append(time.perf_counter() - started)
    stable = node.stable
    batch_stable = min(stable[job.orthanc_study_id] for job in jobs if job.orthanc_study_id in stable)
    return NodeRun(
        stages={stage: statistics.median(job.timings.get(stage, 0.0) for job in sequential) for stage in STAGES},
        job_total=statistics.median(job.timings["total"] for job in sequential),
        e2e=statistics.median(node.latencies(sequential)),
        model_only=statistics.median(model_only),
        per_hour=len(jobs) / (max(job.updated for job in jobs) - batch_stable) * 3600,
        batch=len(jobs),
        prepared_ahead=sum(bool(job.result.get("prepared_ahead")) for job in sequential),
        lesions=statistics.median(int(job.result.get("lesions", 0)) for job in sequential),
        provider=model.provider,
        concurrency=node.config.concurrency,
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # A model trained enough to find a realistic handful of lesions (200 steps; postprocessing and the
        # SEG/SR grow with the number of lesions, so an untrained model's hundreds of blobs would mislead).
        synthesize_to_folder(root / "train", sites=1, studies_per_site=8, seed=1, small=True)
        artifact = train_local_artifact(
            task=None, sources=[str(root / "train")], out=root / "artifact", steps=MODEL_STEPS, version="bench"
        ).artifact
        studies = [render_study(site_profile(1 + n % 3), 1 + n // 3, seed=31) for n in range(STUDIES + SEQUENTIAL)]
        if os.environ.get("RADFED_BENCH_NODE") == "workers":
            workers_table(root, artifact.folder, studies)
            return
        runs = {prefetch: run_node(root, artifact.folder, studies, prefetch) for prefetch in (True, False)}
        beside = [
            run_beside_training(root, artifact.folder, studies[:SEQUENTIAL], root / "train" / "site-1", policy)
            for policy in (DevicePolicy.OFF, DevicePolicy.CLINICAL_FIRST)
        ]
        workers_table(root, artifact.folder, studies)  # printed first: the tables below need no processes
    on, off = runs[True], runs[False]

    def both(value: Callable[[NodeRun], float], fmt: str = "{:.3f}") -> list[str]:
        return [fmt.format(value(on)), fmt.format(value(off))]

    rows = [[stage, f"{on.stages[stage]:.3f}", f"{off.stages[stage]:.3f}"] for stage in STAGES]
    rows.append(["job total (claim -> stored)", *both(lambda r: r.job_total)])
    rows.append(["end-to-end (StableStudy -> stored)", *both(lambda r: r.e2e)])
    rows.append(["model only, same tensors", *both(lambda r: r.model_only)])
    rows.append(["end-to-end / model only (goal <= 1.3)", *both(lambda r: r.e2e / r.model_only, "{:.2f}")])
    rows.append([f"studies prepared ahead (of {SEQUENTIAL})", *both(lambda r: r.prepared_ahead, "{:.0f}")])
    rows.append(["lesions found per study (median)", *both(lambda r: r.lesions, "{:.1f}")])
    rows.append(
        [
            f"batch of {on.batch}: studies per hour, concurrency {on.concurrency} (goal >= 60)",
            *both(lambda r: r.per_hour, "{:.0f}"),
        ]
    )
    rows.append(["provider", on.provider, off.provider])
    table(
        f"node end-to-end: stages and latency over {SEQUENTIAL} studies sent one at a time (medians, s); "
        "StableAge 2 s; with prefetch, load and preprocess run before StableStudy (ahead_*)",
        ["measure", "prefetch on (default)", "prefetch off"],
        rows,
        "make bench  (or: .ci/isolated .venv/bin/python -m bench node; RADFED_BENCH_STUDIES=N)",
    )
    table(
        f"node while a federated round trains on the same node: {SEQUENTIAL} studies sent one at a time (medians, s); "
        "prefetch on; the site's round (DP-SGD, one torch thread) in its own process, the device arbiter shared "
        "through the node's state folder",
        ["measure", "idle (first table)", "training, arbiter off", "training, clinical-first (default)"],
        training_rows(on.e2e, on.stages["model"], beside),
        "make bench  (or: .ci/isolated .venv/bin/python -m bench node; RADFED_BENCH_SEQUENTIAL=N)",
    )
