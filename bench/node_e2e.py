"""End-to-end node benchmark on the default task: StableStudy -> SEG + SR stored, split by stage,
against model-only time on the same tensors, and studies per hour at the default concurrency.

A real Orthanc and the node's own service (in this process, default concurrency 2) process full-size
synthetic studies (3 x 24 x 256 x 256 at site 1; other sites' grids differ). StableStudy times are taken
from Orthanc's /changes by a poller with 0.1 s resolution."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bench.report import table
from radfed.federation.local import train_local_artifact
from radfed.inference.artifact import load_artifact
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.orthanc.launcher import OrthancOptions, start_orthanc
from radfed.inference.preprocess import load_study, prepare
from radfed.inference.study_source import OrthancStudy
from radfed.inference.synthetic.sites import site_profile
from radfed.inference.synthetic.study import SyntheticStudy, render_study
from radfed.inference.synthetic.writer import synthesize_to_folder, upload_study
from radfed.plugin.config import load_config
from radfed.plugin.ledger import JobState
from radfed.plugin.service import NodeService

STUDIES = int(os.environ.get("RADFED_BENCH_STUDIES", "12"))  # the batch (throughput)
SEQUENTIAL = int(os.environ.get("RADFED_BENCH_SEQUENTIAL", "10"))  # one at a time (latency, no queueing)
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


def _stable_times(client: OrthancClient, stop: threading.Event, seen: dict[str, float]) -> None:
    since = 0
    while not stop.is_set():
        changes, last, _done = client.changes(since, limit=500)
        now = time.time()
        for change in changes:
            if change.change_type == "StableStudy":
                seen.setdefault(change.resource_id, now)
        since = last
        stop.wait(0.1)


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
    name = "ahead" if prefetch else "plain"
    orthanc = start_orthanc(root / f"orthanc-{name}", OrthancOptions(name=name, stable_age_s=2))
    config = load_config(
        None,
        {
            "RADFED_ORTHANC_URL": orthanc.url,
            "RADFED_ORTHANC_PASSWORD": orthanc.options.password,
            "RADFED_STATE_DIR": str(root / f"state-{name}"),
            "RADFED_API_TOKEN": "bench",
        },
    )
    config = replace(config, orthanc=orthanc.endpoint, poll_interval_s=0.2, prefetch=prefetch)
    service = NodeService(config)
    service.registry.install(artifact.folder)
    service.registry.activate(artifact.identity.name, artifact.identity.version)
    stop = threading.Event()
    stable: dict[str, float] = {}
    client = OrthancClient(orthanc.endpoint)
    poller = threading.Thread(target=_stable_times, args=(OrthancClient(orthanc.endpoint), stop, stable), daemon=True)
    try:
        poller.start()
        service.start()

        def finished() -> int:
            return len(service.ledger.jobs(state=JobState.DONE, limit=1000)) + len(
                service.ledger.jobs(state=JobState.FAILED, limit=1000)
            )

        def wait_for(count: int) -> None:
            deadline = time.time() + 1800
            while finished() < count:
                if time.time() > deadline:
                    raise TimeoutError("the node did not finish in 30 min")
                time.sleep(0.05)

        # Latency: one study at a time, so no job waits behind another.
        for number, study in enumerate(studies[:SEQUENTIAL], start=1):
            upload_study(study, client)
            wait_for(number)
        sequential = service.ledger.jobs(state=JobState.DONE, limit=1000)
        # Throughput: the batch uploaded at once.
        batch_start = time.time()
        for study in studies[SEQUENTIAL:]:
            upload_study(study, client)
        wait_for(SEQUENTIAL + STUDIES)
        jobs = [j for j in service.ledger.jobs(state=JobState.DONE, limit=1000) if j.created >= batch_start]
        model = service.model
        assert model is not None
        # Model-only time on the same tensors, one study at a time, in this process.
        model_only = []
        for job in sequential:
            prepared = prepare(load_study(OrthancStudy(client, job.orthanc_study_id), artifact.spec), artifact.spec)
            started = time.perf_counter()
            model.predict(prepared.image)
            model_only.append(time.perf_counter() - started)
    finally:
        stop.set()
        service.stop()
        orthanc.stop()
    e2e = [job.updated - stable[job.orthanc_study_id] for job in sequential if job.orthanc_study_id in stable]
    batch_stable = min(stable[job.orthanc_study_id] for job in jobs if job.orthanc_study_id in stable)
    return NodeRun(
        stages={stage: statistics.median(job.timings.get(stage, 0.0) for job in sequential) for stage in STAGES},
        job_total=statistics.median(job.timings["total"] for job in sequential),
        e2e=statistics.median(e2e),
        model_only=statistics.median(model_only),
        per_hour=len(jobs) / (max(job.updated for job in jobs) - batch_stable) * 3600,
        batch=len(jobs),
        prepared_ahead=sum(bool(job.result.get("prepared_ahead")) for job in sequential),
        lesions=statistics.median(int(job.result.get("lesions", 0)) for job in sequential),
        provider=model.provider,
        concurrency=config.concurrency,
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # A model trained enough to find a realistic handful of lesions (200 steps; postprocessing and the
        # SEG/SR grow with the number of lesions, so an untrained model's hundreds of blobs would mislead).
        synthesize_to_folder(root / "train", sites=1, studies_per_site=8, seed=1, small=True)
        artifact = train_local_artifact(
            task=None, sources=[str(root / "train")], out=root / "artifact", steps=200, version="bench"
        ).artifact
        studies = [render_study(site_profile(1 + n % 3), 1 + n // 3, seed=31) for n in range(STUDIES + SEQUENTIAL)]
        runs = {prefetch: run_node(root, artifact.folder, studies, prefetch) for prefetch in (True, False)}
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
