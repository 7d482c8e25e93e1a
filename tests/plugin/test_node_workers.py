"""A coordinator and two worker processes on one PostgreSQL ledger against a real Orthanc (issue 19 item 2): kill -9
of a worker in the middle of a job and of the coordinator loses and duplicates nothing.

Robust on a loaded 2-core machine by design, not by retries: the lease is 60 s (heartbeats every 10 s, so a live
worker's lease outlives five missed heartbeats), every step waits for the condition it needs, read from the shared
ledger, and the test's own uploads are checked instance by instance.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancProcess
from radfed.inference.testing.synthetic.study import SyntheticStudy
from radfed.inference.testing.synthetic.writer import study_datasets, upload_study
from tests.plugin.node_harness import NodeProcess, wait_until
from tests.plugin.test_node_service import _results_per_study, _studies
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.orthanc

LEASE_S = 60.0
# From a dead worker's last heartbeat: its lease runs out, then the next lease round (every 10 s) requeues the job.
RECLAIM_S = LEASE_S + 10.0
FIRST_BATCH, SECOND_BATCH = 6, 4
START_S = 300.0  # radfed serve's start-up (imports, model load) on a starved machine


def _upload(studies: list[SyntheticStudy], client: OrthancClient) -> None:
    for study in studies:
        stored = upload_study(study, client)
        assert stored == len(list(study_datasets(study))), f"Orthanc stored {stored} instances of {study.identity}"


def _expired_leases(*nodes: NodeProcess) -> list[tuple[int, str]]:
    """(job, worker) of every lease that a node found expired and requeued, from the nodes' logs."""
    found = []
    for node in nodes:
        text = node.log.read_text(errors="replace") if node.log.exists() else ""
        found += [(int(job), owner) for job, owner in re.findall(r"job (\d+): the lease of worker (\S+) expired", text)]
    return found


def test_a_coordinator_and_two_workers_on_postgresql_survive_kill_minus_9(
    orthanc: OrthancProcess,
    orthanc_client: OrthancClient,
    postgres: PostgresServer,
    postgres_url: str,
    node_factory: Callable[..., NodeProcess],
) -> None:
    started = time.monotonic()
    settings = f'database_url = "{postgres_url}"\nlease_s = {LEASE_S}'
    coordinator = node_factory(orthanc, role="coordinator", node_settings=settings)
    killed, survivor = (node_factory(orthanc, role="worker", concurrency=1, node_settings=settings) for _ in "ab")
    for node in (coordinator, killed, survivor):
        node.start(timeout_s=START_S)
    killed_id, survivor_id = (node.ready()["worker"] for node in (killed, survivor))

    def diagnostics() -> str:
        return "\n---\n".join(node.log_tail() for node in (coordinator, killed, survivor))

    def jobs() -> list[dict[str, Any]]:
        """The shared ledger's jobs, read from PostgreSQL: a worker's API shares its process with inference."""
        with postgres.connect(postgres_url.rsplit("/", 1)[1]) as connection:
            rows = connection.execute(
                "SELECT id, state, lease_owner, study_instance_uid, attempts, reason, result FROM jobs ORDER BY id"
            ).fetchall()
        keys = ("id", "state", "worker", "study_instance_uid", "attempts", "reason", "result")
        return [{**dict(zip(keys, row, strict=True)), "result": json.loads(str(row[-1]))} for row in rows]

    studies = _studies(FIRST_BATCH + SECOND_BATCH, seed=21)
    first, second = studies[:FIRST_BATCH], studies[FIRST_BATCH:]
    _upload(first, orthanc_client)

    # Both workers take jobs from the one queue; the first is killed while it holds one.
    def shared_and_first_busy() -> bool:
        listed = jobs()
        busy = any(j["state"] == "running" and j["worker"] == killed_id for j in listed)
        return busy and any(j["worker"] == survivor_id for j in listed)

    wait_until(shared_and_first_busy, 400, "both workers with jobs, the first running one", diagnostics)
    killed.kill()
    killed_at = time.monotonic()
    held = [j["id"] for j in jobs() if j["state"] == "running" and j["worker"] == killed_id]
    assert held, "the killed worker held no job"

    # The coordinator is killed once it queued a job of the second batch; the rest of the batch arrives while it
    # is down (it must catch up from its cursor). Meanwhile the dead worker's lease runs out and its job is run
    # again: heartbeats every 10 s, so not before LEASE_S - 10 s.
    second_uids = {s.identity.study_instance_uid for s in second}
    _upload(second[:2], orthanc_client)
    wait_until(
        lambda: any(j["study_instance_uid"] in second_uids for j in jobs()), 300, "the second batch", diagnostics
    )
    coordinator.kill()
    _upload(second[2:], orthanc_client)

    def held_done() -> bool:
        by_id = {j["id"]: j for j in jobs()}
        return all(by_id[job_id]["state"] == "done" for job_id in held)

    wait_until(held_done, RECLAIM_S + 300, "the dead worker's job run again", survivor.log_tail)
    assert time.monotonic() - killed_at >= LEASE_S - 10
    assert len(jobs()) <= len(studies) - len(second[2:]), "nothing examines while the coordinator is down"
    coordinator.start(timeout_s=START_S)

    def all_finished() -> bool:
        listed = jobs()
        return len(listed) == len(studies) and all(j["state"] in ("done", "failed") for j in listed)

    wait_until(all_finished, 900, f"{len(studies)} jobs", diagnostics)
    listed = jobs()
    assert {j["state"] for j in listed} == {"done"}, [(j["id"], j["state"], j["reason"]) for j in listed]
    assert sorted(j["study_instance_uid"] for j in listed) == sorted(s.identity.study_instance_uid for s in studies)

    # The killed worker's job was requeued once its lease expired and run again by the survivor; no live worker's
    # lease ever expired.
    by_id = {j["id"]: j for j in listed}
    for job_id in held:
        assert by_id[job_id]["worker"] == survivor_id and by_id[job_id]["attempts"] >= 2, by_id[job_id]
    expired = _expired_leases(coordinator, survivor)
    assert {job for job, _ in expired} >= set(held), expired
    assert {owner for _, owner in expired} == {killed_id}, expired
    assert "its lease expired while it ran" not in survivor.log.read_text(errors="replace")

    # Exactly one SR (and one SEG where there are lesions) per study in Orthanc.
    results = _results_per_study(orthanc_client)
    assert len(results) == len(studies)
    for job in listed:
        got = results[job["study_instance_uid"]]
        assert got["SR"] == 1, (job["id"], got)
        assert got["SEG"] == (1 if job["result"]["lesions"] else 0), (job["id"], got)

    # The workers list: the dead worker is no longer alive, the survivor is and says what it runs on.
    workers = {w["id"]: w for w in coordinator.get("/workers")}
    assert workers[killed_id]["alive"] is False and workers[killed_id]["running"] == []
    assert workers[survivor_id]["alive"] is True and workers[survivor_id]["role"] == "worker"
    assert workers[survivor_id]["device"] == "cpu (CPUExecutionProvider)"
    assert sum(w["role"] == "coordinator" for w in workers.values()) == 2  # the killed one and its restart
    print(f"\ncoordinator + 2 workers, {len(studies)} studies: {time.monotonic() - started:.0f} s")
