"""``python -m bench node``, workers table: one node process on SQLite (the default), one on PostgreSQL, and a
coordinator with 1 and 2 worker processes sharing a PostgreSQL ledger, side by side in one run. Real
``radfed serve`` processes (roles ``all``, ``coordinator``, ``worker``), a fresh Orthanc each, the Debian
PostgreSQL server started for the run: StableStudy -> SEG + SR stored for studies sent one at a time, and studies
per hour for a batch sent at once.

    RADFED_BENCH_NODE=workers python -m bench node    # this table only (run inside .ci/isolated)
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import table
from bench.running_node import stable_times
from radfed.inference.model.artifact import load_artifact
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancOptions, start_orthanc
from radfed.inference.testing.synthetic.study import SyntheticStudy
from radfed.inference.testing.synthetic.writer import upload_study
from tests.plugin.node_harness import NodeProcess
from tests.postgres_server import PostgresServer, start_postgres

SEQUENTIAL = int(os.environ.get("RADFED_BENCH_WORKERS_SEQUENTIAL", "4"))
BATCH = int(os.environ.get("RADFED_BENCH_WORKERS_BATCH", "12"))
CONCURRENCY = 2  # per process, the node's default
SETUPS = (("SQLite", 0), ("PostgreSQL", 0), ("PostgreSQL", 1), ("PostgreSQL", 2))  # (engine, worker processes)


@dataclass(frozen=True)
class WorkersRun:
    engine: str
    workers: int  # 0: one process doing everything (role all)
    latency: float  # median StableStudy -> stored, one at a time
    per_hour: float  # batch
    batch: int
    workers_used: int  # worker processes that ran at least one batch job


def _done(node: NodeProcess) -> list[dict[str, Any]]:
    return [job for job in node.jobs() if job["state"] in ("done", "failed")]


def _wait(node: NodeProcess, count: int, timeout_s: float = 1800) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while len(done := _done(node)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} jobs not finished in {timeout_s:.0f} s:\n{node.log_tail()}")
        time.sleep(0.1)
    return done


def run_setup(
    root: Path, artifact: Path, studies: list[SyntheticStudy], engine: str, workers: int, pg: PostgresServer
) -> WorkersRun:
    name = f"{engine.lower()}-{workers}"
    orthanc = start_orthanc(root / f"orthanc-{name}", OrthancOptions(name=name, stable_age_s=2))
    settings = f'database_url = "{pg.create_database(name.replace("-", "_"))}"' if engine == "PostgreSQL" else ""
    if workers == 0:
        nodes = [NodeProcess(root / name / "all", orthanc, artifact, concurrency=CONCURRENCY, node_settings=settings)]
    else:
        nodes = [
            NodeProcess(root / name / "coordinator", orthanc, artifact, role="coordinator", node_settings=settings)
        ]
        nodes += [
            NodeProcess(root / name / f"worker-{n}", orthanc, artifact, role="worker", concurrency=CONCURRENCY,
                        node_settings=settings)
            for n in range(workers)
        ]  # fmt: skip
    stable: dict[str, float] = {}
    stop = threading.Event()
    poller = threading.Thread(target=stable_times, args=(OrthancClient(orthanc.endpoint), stop, stable))
    client = OrthancClient(orthanc.endpoint)
    try:
        identity = load_artifact(artifact).identity
        for node in nodes:
            node.start(timeout_s=300, activate=f"{identity.name}:{identity.version}")
        poller.start()
        api = nodes[0]  # every process reads the one ledger
        for number, study in enumerate(studies[:SEQUENTIAL], start=1):
            upload_study(study, client)
            _wait(api, number)
        sequential = _done(api)
        started = time.time()
        for study in studies[SEQUENTIAL : SEQUENTIAL + BATCH]:
            upload_study(study, client)
        batch = [job for job in _wait(api, SEQUENTIAL + BATCH) if job["created"] >= started]
    finally:
        stop.set()
        for node in nodes:
            node.stop()
        orthanc.stop()
        if poller.is_alive():
            poller.join(timeout=5)
    latencies = [
        job["updated"] - stable[job["orthanc_study_id"]] for job in sequential if job["orthanc_study_id"] in stable
    ]
    first_stable = min(stable[job["orthanc_study_id"]] for job in batch if job["orthanc_study_id"] in stable)
    return WorkersRun(
        engine=engine,
        workers=workers,
        latency=statistics.median(latencies),
        per_hour=len(batch) / (max(job["updated"] for job in batch) - first_stable) * 3600,
        batch=len(batch),
        workers_used=len({job["worker"] for job in batch}),
    )


def workers_table(root: Path, artifact: Path, studies: list[SyntheticStudy]) -> None:
    pg = start_postgres()
    try:
        runs = [run_setup(root, artifact, studies, engine, workers, pg) for engine, workers in SETUPS]
    finally:
        pg.stop()
    rows = [
        [
            r.engine,
            "one process (role all)" if r.workers == 0 else f"coordinator + {r.workers} worker(s)",
            f"{r.latency:.2f}",
            f"{r.per_hour:.0f}",
            str(r.workers_used),
        ]
        for r in runs
    ]
    table(
        f"node workers: {SEQUENTIAL} studies sent one at a time, then a batch of {BATCH} (real radfed serve processes, "
        f"concurrency {CONCURRENCY} per job-running process, StableAge 2 s, a fresh Orthanc per row)",
        [
            "ledger",
            "processes",
            "StableStudy -> stored, median s",
            "studies per hour (batch)",
            "processes that ran jobs",
        ],
        rows,
        ".ci/isolated .venv/bin/python -m bench node  (RADFED_BENCH_NODE=workers: this table only)",
    )
