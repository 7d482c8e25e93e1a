"""What ``/ready`` knows: loops that fail, stall or stop; a ledger that cannot be written (on either engine) and
how it is backed up; failure kinds from exceptions. The ledger's own tests are in test_ledger.py."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from radfed.inference.errors import NotAVolumeError, OrthancRequestError, OrthancUnavailableError, VolumeErrorCause
from radfed.inference.orthanc.client import Change, OrthancEndpoint
from radfed.inference.testing.orthanc_server import free_port
from radfed.plugin.node.config import NodeConfig
from radfed.plugin.node.failures import FailureKind, failure_label
from radfed.plugin.node.health import LoopMonitor, LoopStatus
from radfed.plugin.node.ledger.store import LedgerBackend
from radfed.plugin.node.service import NodeService, ReprocessError


def _status(monitor: LoopMonitor) -> dict[str, LoopStatus]:
    return {report.name: report.status for report in monitor.report()}


def test_a_loop_that_raises_is_failing_until_a_good_round() -> None:
    monitor = LoopMonitor()
    monitor.register("examiner")
    assert _status(monitor) == {"examiner": LoopStatus.OK}
    monitor.failed("examiner", ValueError("ImageOrientationPatient has 1 value"))
    monitor.failed("examiner", ValueError("ImageOrientationPatient has 1 value"))
    report = monitor.report()[0]
    assert report.status is LoopStatus.FAILING and "2 failure(s)" in report.reason and "ValueError" in report.reason
    monitor.beat("examiner")
    assert _status(monitor) == {"examiner": LoopStatus.OK}


def test_a_silent_loop_stalls_sooner_when_idle_than_when_busy_and_a_dead_thread_is_stopped() -> None:
    monitor = LoopMonitor(stall_after_s=0.05, busy_stall_after_s=0.5)
    finished = threading.Thread(target=lambda: None)
    finished.start()
    finished.join()
    monitor.register("follower")
    monitor.register("worker-0")
    monitor.register("prefetch", finished, beats=False)
    monitor.busy("worker-0")
    time.sleep(0.1)
    assert _status(monitor) == {
        "follower": LoopStatus.STALLED,
        "prefetch": LoopStatus.STOPPED,
        "worker-0": LoopStatus.OK,  # busy with one study: given longer
    }


def _service(tmp_path: Path, database_url: str | None = None) -> NodeService:
    # Orthanc on a port nobody listens on: readiness must say so, not hang or raise.
    config = NodeConfig(
        database_url=database_url,
        orthanc=OrthancEndpoint(f"http://127.0.0.1:{free_port()}"),
        state_dir=tmp_path / "state",
        models_dir=tmp_path / "models",
        api_token="t",
        prefetch=False,
    )
    return NodeService(config)


# What a full disk or a read-only mount or replica does to a write, injected on every new connection of the node's.
_READ_ONLY = {
    LedgerBackend.SQLITE: ("PRAGMA query_only = ON", "readonly"),
    LedgerBackend.POSTGRESQL: ("SET default_transaction_read_only = on", "read-only transaction"),
}


@pytest.mark.parametrize("backend", list(LedgerBackend))
def test_readiness_names_a_ledger_that_cannot_be_written(
    tmp_path: Path, backend: LedgerBackend, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_url") if backend is LedgerBackend.POSTGRESQL else None
    service = _service(tmp_path, url)
    try:
        before = service.readiness()
        assert before["ledger"] == "ok" and not before["ready"] and before["ledger_backend"] == backend.value
        assert "Orthanc does not answer" in before["problems"] and "no active model" in before["problems"]
        statement, message = _READ_ONLY[backend]

        def read_only(dbapi: Any, _: object) -> None:
            dbapi.execute(statement)
            dbapi.commit()  # psycopg runs even a SET in a transaction

        sa.event.listen(service.ledger.engine, "connect", read_only)
        service.ledger.engine.dispose()
        after = service.readiness()
        assert after["ready"] is False and message in after["ledger"]
        assert any(p.startswith("the ledger cannot be written") for p in after["problems"])
        assert service.metrics.ready._value.get() == 0
    finally:
        service.ledger.close()


def test_readiness_says_who_backs_the_ledger_up(tmp_path: Path, postgres_url: str) -> None:
    sqlite_node, postgresql_node = _service(tmp_path / "a"), _service(tmp_path / "b", postgres_url)
    try:
        assert sqlite_node.readiness()["ledger_backups"].startswith("online copies every 3600 s in ")
        assert "pg_dump" in postgresql_node.readiness()["ledger_backups"]
    finally:
        sqlite_node.ledger.close()
        postgresql_node.ledger.close()


def test_failure_kinds_are_one_vocabulary() -> None:
    bad = NotAVolumeError(VolumeErrorCause.DUPLICATE_POSITIONS, "24 slices at one position")
    assert failure_label(bad) == f"bad-input:{VolumeErrorCause.DUPLICATE_POSITIONS.value}"
    assert failure_label(OrthancRequestError("POST", "/instances", 409, "refused")) == "orthanc-http:409"
    assert failure_label(ValueError("ImageOrientationPatient"), examining=True) == FailureKind.UNEXAMINABLE
    assert failure_label(ZeroDivisionError()) == FailureKind.INTERNAL


def test_reprocessing_needs_a_real_date(tmp_path: Path) -> None:
    service = _service(tmp_path)
    try:
        for bad in ("85328574T925053", "20261332", "2026-11-01", "yesterday"):
            with pytest.raises(ReprocessError, match="since must be a date"):
                service.reprocess_since(bad)
    finally:
        service.ledger.close()


def test_orthanc_leaving_in_the_middle_of_a_batch_of_changes_keeps_the_follower_alive_and_the_batch(
    tmp_path: Path,
) -> None:
    # The race CI met: /changes answered, then Orthanc restarted before the NewSeries lookup. Injected, since a
    # real Orthanc cannot be stopped between two of the follower's requests on cue.
    service = _service(tmp_path)
    service.health.register("follower")
    batch = [Change(1, "NewSeries", "Series", "s1"), Change(2, "StableStudy", "Study", "st1")]
    lookups: list[str] = []

    def changes(since: int, limit: int = 100) -> tuple[list[Change], int, bool]:
        return (batch, 2, True) if since == 0 else ([], since, True)

    def get_json(path: str, params: Any = None) -> Any:
        lookups.append(path)
        if len(lookups) == 1:
            raise OrthancUnavailableError("Orthanc at test does not answer: restarting")
        return {"ParentStudy": "st1"}

    service.client.changes = changes  # type: ignore[method-assign]
    service.client.get_json = get_json  # type: ignore[method-assign]
    service.follower.config = dataclasses.replace(service.config, retry_base_s=0.05, poll_interval_s=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=service.follower.follow, args=("follower", stop), daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 10
        while service.ledger.cursor() != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.ledger.cursor() == 2, "the batch was never taken once Orthanc was back"
        assert lookups == ["/series/s1", "/series/s1"], "the series was not looked up again after the outage"
        assert service.ledger.next_inbox() == ("st1", 2)
        service.ledger.inbox_done("st1", 2)
        assert service.ledger.next_inbox() is None, "the StableStudy came into the inbox twice"
        assert thread.is_alive() and service.orthanc_reachable
        assert _status(service.health)["follower"] is LoopStatus.OK
    finally:
        stop.set()
        thread.join(5)
        service.ledger.close()
