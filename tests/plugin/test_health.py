"""What ``/ready`` knows: loops that fail, stall or stop; a ledger that cannot be written, is damaged or is
backed up; failure kinds from exceptions."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from radfed.inference.errors import NotAVolumeError, OrthancRequestError, VolumeErrorCause
from radfed.inference.orthanc.client import OrthancEndpoint
from radfed.inference.orthanc.launcher import free_port
from radfed.plugin.config import NodeConfig
from radfed.plugin.failures import FailureKind, failure_label
from radfed.plugin.health import LoopMonitor, LoopStatus
from radfed.plugin.ledger import JobState, Ledger, LedgerError
from radfed.plugin.service import NodeService, ReprocessError


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


def _service(tmp_path: Path) -> NodeService:
    # Orthanc on a port nobody listens on: readiness must say so, not hang or raise.
    config = NodeConfig(
        orthanc=OrthancEndpoint(f"http://127.0.0.1:{free_port()}"),
        state_dir=tmp_path / "state",
        models_dir=tmp_path / "models",
        api_token="t",
        prefetch=False,
    )
    return NodeService(config)


def test_readiness_names_a_ledger_that_cannot_be_written(tmp_path: Path) -> None:
    service = _service(tmp_path)
    try:
        before = service.readiness()
        assert before["ledger"] == "ok" and not before["ready"]
        assert "Orthanc does not answer" in before["problems"] and "no active model" in before["problems"]
        # What a full disk or a read-only mount does to a write (fault injected on the node's own connection).
        service.ledger._db.execute("PRAGMA query_only = ON")
        after = service.readiness()
        assert after["ready"] is False and "readonly" in after["ledger"]
        assert any(p.startswith("the ledger cannot be written") for p in after["problems"])
        assert service.metrics.ready._value.get() == 0
    finally:
        service.ledger.close()


def _ledger_with_jobs(path: Path, jobs: int) -> None:
    ledger = Ledger(path)
    for n in range(jobs):
        ledger.create_job(
            study_instance_uid=f"1.2.{n}", orthanc_study_id=f"s{n}", model_name="m", model_version="1", fingerprint="f"
        )
    ledger.close()


def test_a_damaged_ledger_stops_the_node_naming_the_file_and_what_to_do(tmp_path: Path) -> None:
    header = tmp_path / "header.sqlite"
    _ledger_with_jobs(header, 3)
    data = bytearray(header.read_bytes())
    data[:16] = b"not a database!!"
    header.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match=r"header\.sqlite cannot be opened as a ledger.*backup"):
        Ledger(header)

    pages = tmp_path / "pages.sqlite"
    _ledger_with_jobs(pages, 400)  # several pages of jobs and index
    data = bytearray(pages.read_bytes())
    page = 4096
    for offset in range(2 * page + 8, len(data) - page, page):  # scribble over every page's cell area
        data[offset : offset + 64] = b"\xff" * 64
    pages.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match=r"pages\.sqlite is damaged"):
        Ledger(pages)


def test_online_backups_are_complete_ledgers_and_only_the_newest_stay(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.create_job(study_instance_uid="1.2.3", orthanc_study_id="s", model_name="m", model_version="1",
                      fingerprint="f")  # fmt: skip
    copies = []
    for _ in range(3):
        copies.append(ledger.backup(tmp_path / "backups", keep=2))
        time.sleep(1.05)  # one copy per second at most (names carry the time)
    ledger.close()
    kept = sorted((tmp_path / "backups").glob("ledger-*.sqlite"))
    assert kept == copies[1:]
    restored = Ledger(kept[-1])
    assert [j.study_instance_uid for j in restored.jobs(state=JobState.QUEUED)] == ["1.2.3"]
    restored.close()


def test_failure_kinds_are_one_vocabulary() -> None:
    bad = NotAVolumeError(VolumeErrorCause.DUPLICATE_POSITIONS, "24 slices at one position")
    assert failure_label(bad) == f"bad-input:{VolumeErrorCause.DUPLICATE_POSITIONS.value}"
    assert failure_label(OrthancRequestError("POST", "/instances", 409, "refused")) == "orthanc-http:409"
    assert failure_label(ValueError("ImageOrientationPatient"), examining=True) == FailureKind.UNEXAMINABLE
    assert failure_label(ZeroDivisionError()) == FailureKind.INTERNAL


def test_changed_studies_wait_for_stable_study_and_quiet_ones_are_examined(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        ledger.receive([], cursor=10, changed=["study-a", "study-b", "study-c"])
        ledger.receive([("study-a", 11)], cursor=11)  # a's StableStudy came: nothing to reconcile
        assert ledger.quiet_pending(quiet_s=3600) == []
        assert sorted(ledger.quiet_pending(quiet_s=0)) == ["study-b", "study-c"]
        ledger.settle_pending(examine=["study-b"], forget=[], wait=["study-c"])
        assert ledger.next_inbox() == ("study-a", 11)
        ledger.inbox_done("study-a", 11)
        assert ledger.next_inbox() == ("study-b", -1)
        assert ledger.quiet_pending(quiet_s=3600) == []  # c waits again from now
        assert ledger.quiet_pending(quiet_s=0) == ["study-c"]
    finally:
        ledger.close()


def test_reprocessing_needs_a_real_date(tmp_path: Path) -> None:
    service = _service(tmp_path)
    try:
        for bad in ("85328574T925053", "20261332", "2026-11-01", "yesterday"):
            with pytest.raises(ReprocessError, match="since must be a date"):
                service.reprocess_since(bad)
    finally:
        service.ledger.close()


def test_a_failed_backup_leaves_no_partial_copy(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "ledger-20000101T000000Z.sqlite").mkdir()  # a directory where the copy's name would go: fails
    try:
        original = time.strftime
        time.strftime = lambda *_: "ledger-20000101T000000Z.sqlite"  # type: ignore[assignment]
        with pytest.raises((OSError, sqlite3.Error)):
            ledger.backup(backups, keep=2)
    finally:
        time.strftime = original
        ledger.close()
    assert not list(backups.glob("*.partial"))
