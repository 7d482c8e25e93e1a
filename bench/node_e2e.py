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
from pathlib import Path

from bench.report import table
from radfed.federation.local import train_local_artifact
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.orthanc.launcher import OrthancOptions, start_orthanc
from radfed.inference.preprocess import load_study, prepare
from radfed.inference.study_source import OrthancStudy
from radfed.inference.synthetic.sites import site_profile
from radfed.inference.synthetic.study import render_study
from radfed.inference.synthetic.writer import synthesize_to_folder, upload_study
from radfed.plugin.config import load_config
from radfed.plugin.ledger import JobState
from radfed.plugin.service import NodeService

STUDIES = int(os.environ.get("RADFED_BENCH_STUDIES", "12"))  # the batch (throughput)
SEQUENTIAL = int(os.environ.get("RADFED_BENCH_SEQUENTIAL", "10"))  # one at a time (latency, no queueing)
STAGES = ("fetch", "load", "preprocess", "model", "postprocess", "encode", "qa", "store")


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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize_to_folder(root / "train", sites=1, studies_per_site=3, seed=1, small=True)
        artifact = train_local_artifact(
            task=None, sources=[str(root / "train")], out=root / "artifact", epochs=1, version="bench"
        ).artifact
        orthanc = start_orthanc(root / "orthanc", OrthancOptions(name="bench", stable_age_s=2))
        config = load_config(
            None,
            {
                "RADFED_ORTHANC_URL": orthanc.url,
                "RADFED_ORTHANC_PASSWORD": orthanc.options.password,
                "RADFED_STATE_DIR": str(root / "state"),
                "RADFED_API_TOKEN": "bench",
            },
        )
        config = type(config)(**{**config.__dict__, "orthanc": orthanc.endpoint, "poll_interval_s": 0.2})
        service = NodeService(config)
        service.registry.install(artifact.folder)
        service.registry.activate(artifact.identity.name, artifact.identity.version)
        studies = [render_study(site_profile(1 + n % 3), 1 + n // 3, seed=31) for n in range(STUDIES + SEQUENTIAL)]
        stop = threading.Event()
        stable: dict[str, float] = {}
        client = OrthancClient(orthanc.endpoint)
        poller = threading.Thread(
            target=_stable_times, args=(OrthancClient(orthanc.endpoint), stop, stable), daemon=True
        )
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
    per_hour = len(jobs) / (max(job.updated for job in jobs) - batch_stable) * 3600
    rows = [[stage, f"{statistics.median(job.timings.get(stage, 0.0) for job in sequential):.3f}"] for stage in STAGES]
    rows.append(["job total (claim -> stored)", f"{statistics.median(job.timings['total'] for job in sequential):.3f}"])
    rows.append(["end-to-end (StableStudy -> stored)", f"{statistics.median(e2e):.3f}"])
    rows.append(["model only, same tensors", f"{statistics.median(model_only):.3f}"])
    rows.append(
        ["end-to-end / model only", f"{statistics.median(e2e) / statistics.median(model_only):.2f} (goal <= 1.3)"]
    )
    rows.append(
        [f"batch of {len(jobs)}: studies per hour, concurrency {config.concurrency}", f"{per_hour:.0f} (goal >= 60)"]
    )
    rows.append(["provider", model.provider])
    table(
        f"node end-to-end: stages and latency over {len(sequential)} studies sent one at a time (medians, s)",
        ["measure", "value"],
        rows,
        "make bench  (or: .ci/isolated .venv/bin/python -m bench node; RADFED_BENCH_STUDIES=N)",
    )
