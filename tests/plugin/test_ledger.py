"""The ledger on both of its engines (a SQLite file, a real PostgreSQL server): exactly-once jobs, atomic claims,
the cursor and the inbox, the migrated schema; SQLite's own checks and backups; a ledger from before migrations."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from radfed.plugin.node.config import ConfigError, load_config
from radfed.plugin.node.ledger.migrations import LOCATION
from radfed.plugin.node.ledger.schema import metadata
from radfed.plugin.node.ledger.store import Job, JobStatus, Ledger, LedgerBackend, LedgerError, Worker


@pytest.fixture(params=[LedgerBackend.SQLITE, LedgerBackend.POSTGRESQL])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a ledger goes: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param is LedgerBackend.SQLITE:
        return tmp_path / "ledger.sqlite"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def ledger(location: Path | str) -> Iterator[Ledger]:
    opened = Ledger(location)
    yield opened
    opened.close()


def _create(ledger: Ledger, uid: str, fingerprint: str = "f", version: str = "1") -> tuple[Job, bool]:
    return ledger.create_job(
        study_instance_uid=uid, orthanc_study_id=f"o-{uid}", model_name="m", model_version=version,
        fingerprint=fingerprint,
    )  # fmt: skip


def _head() -> str:
    head = ScriptDirectory(str(LOCATION)).get_current_head()
    assert head is not None
    return head


def test_a_job_key_is_created_once_and_a_new_input_is_a_new_job(ledger: Ledger) -> None:
    first, created = _create(ledger, "1.2.3")
    again, created_again = _create(ledger, "1.2.3")
    later, created_later = _create(ledger, "1.2.3", fingerprint="g")  # a late instance changes the input
    assert (created, created_again, created_later) == (True, False, True)
    assert again == first and later.id > first.id
    assert [j.id for j in ledger.jobs(study_instance_uid="1.2.3")] == [later.id, first.id]
    assert ledger.counts() == {"queued": 2}


def test_a_claimed_job_runs_once_and_its_result_supersedes(ledger: Ledger) -> None:
    older, _ = _create(ledger, "1.2.3", version="1")
    claimed = ledger.claim()
    assert claimed is not None and claimed.id == older.id
    assert claimed.state is JobStatus.RUNNING and claimed.attempts == 1
    assert ledger.claim() is None
    ledger.finish(older.id, JobStatus.DONE, timings={"total": 1.5}, result={"sr_sop_instance_uid": "9.9"})
    newer, _ = _create(ledger, "1.2.3", version="2")
    previous = ledger.previous_done("1.2.3", "m", exclude_job=newer.id)
    assert previous is not None and previous.result == {"sr_sop_instance_uid": "9.9"}
    assert previous.timings == {"total": 1.5}
    assert ledger.previous_done("1.2.3", "m", exclude_job=older.id) is None


def _worker(name: str, role: str = "worker") -> Worker:
    return Worker(name, "host-1", 4242, role, "cpu (CPUExecutionProvider)", started=time.time(), last_seen=0.0)


def test_requeued_jobs_wait_and_a_dead_workers_jobs_return_to_the_queue(ledger: Ledger) -> None:
    job, _ = _create(ledger, "1")
    ledger.claim("a")
    assert ledger.requeue(job.id, delay_s=3600, reason="Orthanc unreachable", worker="a")
    assert ledger.claim("a") is None  # not before an hour
    second, _ = _create(ledger, "2")
    claimed = ledger.claim("a", lease_s=1.5)
    assert claimed is not None and claimed.id == second.id and claimed.worker == "a"
    assert ledger.reclaim_expired() == []  # a holds it
    time.sleep(1.6)  # a was killed: no heartbeat
    assert ledger.reclaim_expired() == [(second.id, "a")]
    requeued = ledger.job(second.id)
    assert requeued is not None and requeued.state is JobStatus.QUEUED and "lease of a expired" in requeued.reason


def test_a_worker_whose_lease_expired_records_nothing_and_the_new_runner_does(ledger: Ledger) -> None:
    job, _ = _create(ledger, "1")
    ledger.claim("a", lease_s=0.5)
    time.sleep(0.6)
    ledger.heartbeat(_worker("b"), lease_s=60)  # b's heartbeat renews only b's leases
    assert ledger.reclaim_expired() == [(job.id, "a")]
    again = ledger.claim("b", lease_s=60)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert ledger.finish(job.id, JobStatus.DONE, result={"by": "a"}, worker="a") is False  # back from the dead
    assert ledger.requeue(job.id, 1, "Orthanc unreachable", worker="a") is False
    assert ledger.finish(job.id, JobStatus.DONE, result={"by": "b"}, worker="b") is True
    done = ledger.job(job.id)
    assert done is not None and done.state is JobStatus.DONE and done.result == {"by": "b"} and done.worker == "b"


def test_a_stale_claim_of_the_same_process_records_nothing(ledger: Ledger) -> None:
    """A process's threads share its worker id: a lease that expired and was claimed again by another of its threads
    is told apart by the claim's attempt number."""
    job, _ = _create(ledger, "1")
    stale = ledger.claim("a", lease_s=0.5)
    time.sleep(0.6)  # a's heartbeats stalled (a loaded machine) while its thread ran the job
    assert ledger.reclaim_expired() == [(job.id, "a")]
    again = ledger.claim("a", lease_s=60)  # a's other thread
    assert stale is not None and again is not None and (stale.attempts, again.attempts) == (1, 2)
    assert ledger.requeue(job.id, 1, "Orthanc unreachable", worker="a", attempt=stale.attempts) is False
    assert ledger.finish(job.id, JobStatus.FAILED, reason="stale", worker="a", attempt=stale.attempts) is False
    assert ledger.finish(job.id, JobStatus.DONE, result={"by": 2}, worker="a", attempt=again.attempts) is True
    done = ledger.job(job.id)
    assert done is not None and done.state is JobStatus.DONE and done.result == {"by": 2}


def test_heartbeats_keep_a_long_job_and_the_workers_are_listed(ledger: Ledger) -> None:
    job, _ = _create(ledger, "1")
    ledger.heartbeat(_worker("coordinator", role="coordinator"), lease_s=0.5)
    ledger.claim("a", lease_s=3.0)
    for _ in range(4):  # 4 s of work, more than the lease
        time.sleep(1.0)
        assert ledger.heartbeat(_worker("a"), lease_s=3.0) == 1
        assert ledger.reclaim_expired() == []
    listed = {w.id: w for w in ledger.workers()}
    assert listed.keys() == {"coordinator", "a"} and listed["a"].role == "worker" and listed["a"].pid == 4242
    assert listed["a"].device == "cpu (CPUExecutionProvider)" and listed["a"].as_dict(lease_s=30)["alive"]
    assert listed["a"].last_seen > listed["coordinator"].last_seen
    running = ledger.job(job.id)
    assert running is not None and running.state is JobStatus.RUNNING and running.worker == "a"


def test_only_failed_or_skipped_jobs_are_retried(ledger: Ledger) -> None:
    failed, _ = _create(ledger, "1")
    done, _ = _create(ledger, "2")
    ledger.finish(failed.id, JobStatus.FAILED, reason="no volume", failure_kind="bad-input:x")
    ledger.finish(done.id, JobStatus.DONE)
    assert ledger.failure_counts() == {"bad-input:x": 1}
    retried, kept = ledger.retry(failed.id), ledger.retry(done.id)
    assert retried is not None and retried.state is JobStatus.QUEUED and retried.reason == "retry requested"
    assert kept is not None and kept.state is JobStatus.DONE
    assert ledger.retry(12345) is None


def test_concurrent_claimers_take_every_job_exactly_once(location: Path | str) -> None:
    """Four claimers, each with its own engine and connections (as separate processes would have)."""
    setup = Ledger(location)
    expected = {_create(setup, f"1.{n}")[0].id for n in range(60)}
    claimers = [Ledger(location) for _ in range(4)]
    taken: list[list[int]] = [[] for _ in claimers]
    start = threading.Barrier(len(claimers))

    def drain(index: int) -> None:
        start.wait()
        while (job := claimers[index].claim()) is not None:
            taken[index].append(job.id)
            time.sleep(0.002)  # a job's work: the others claim meanwhile

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(claimers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    everything = [job_id for ids in taken for job_id in ids]
    assert sorted(everything) == sorted(expected)  # none twice, none left
    assert sum(1 for ids in taken if ids) >= 2, taken  # they really ran side by side
    assert setup.counts() == {"running": 60}
    for opened in [setup, *claimers]:
        opened.close()


def test_a_postgresql_claim_skips_a_job_another_worker_holds(postgres_url: str) -> None:
    """FOR UPDATE SKIP LOCKED: a claimer neither waits for nor takes a row another transaction has locked."""
    ledger = Ledger(postgres_url)
    try:
        first, second = _create(ledger, "1")[0], _create(ledger, "2")[0]
        with ledger.engine.connect() as other, other.begin():
            other.execute(sa.text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": first.id})
            started = time.monotonic()
            claimed = ledger.claim()
            waited = time.monotonic() - started
        assert claimed is not None and claimed.id == second.id and waited < 5
        again = ledger.claim()
        assert again is not None and again.id == first.id  # free again once the other transaction ended
    finally:
        ledger.close()


def test_the_cursor_and_inbox_advance_together(ledger: Ledger) -> None:
    assert ledger.is_new() and ledger.cursor() == 0
    ledger.receive([("study-a", 11), ("study-b", 12)], cursor=12)
    assert not ledger.is_new() and ledger.cursor() == 12 and ledger.inbox_depth() == 2
    ledger.receive([("study-a", 15)], cursor=15)  # a again, later: one row, the newer change
    ledger.inbox_done("study-a", 11)  # an examination of the older change does not remove the newer
    assert ledger.cursor() == 15 and ledger.inbox_depth() == 2
    ledger.inbox_retry("study-b", delay_s=3600)
    assert ledger.next_inbox() == ("study-a", 15)
    ledger.inbox_done("study-a", 15)
    assert ledger.next_inbox() is None and ledger.inbox_depth() == 1  # b waits an hour
    ledger.set_cursor(2**40)  # Orthanc's change numbers are 64-bit
    assert ledger.cursor() == 2**40


def test_changed_studies_wait_for_stable_study_and_quiet_ones_are_examined(ledger: Ledger) -> None:
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


def test_the_migrations_make_exactly_the_declared_schema(ledger: Ledger) -> None:
    with ledger.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == _head()
        assert compare_metadata(context, metadata) == []


def test_a_postgresql_ledger_is_not_backed_up_by_the_node(tmp_path: Path, postgres_url: str) -> None:
    ledger = Ledger(postgres_url)
    try:
        assert ledger.backend is LedgerBackend.POSTGRESQL and "***" in ledger.name  # never the password
        with pytest.raises(LedgerError, match="pg_dump"):
            ledger.backup(tmp_path / "backups", keep=2)
    finally:
        ledger.close()
    assert not (tmp_path / "backups").exists()


def test_an_unreachable_postgresql_names_the_server_not_the_password(postgres_url: str) -> None:
    wrong = postgres_url.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(LedgerError, match=r"cannot be reached.*no_such_database") as raised:
        Ledger(wrong)
    assert wrong.split(":")[2].split("@")[0] not in str(raised.value)


# -- a ledger from before migrations (the schema radfed shipped until Alembic came) ------------------------------

_PRE_MIGRATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS inbox (
    orthanc_study_id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    received REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    orthanc_study_id TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    failure_kind TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    timings TEXT NOT NULL DEFAULT '{}',
    selection TEXT NOT NULL DEFAULT '[]',
    result TEXT NOT NULL DEFAULT '{}',
    UNIQUE (study_instance_uid, model_name, model_version, fingerprint)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, not_before);
CREATE TABLE IF NOT EXISTS pending (
    orthanc_study_id TEXT PRIMARY KEY,
    last_seen REAL NOT NULL
);
"""
_FIRST_SCHEMA = _PRE_MIGRATION_SCHEMA.split("CREATE TABLE IF NOT EXISTS pending")[0]  # before pending came


def _old_ledger(path: Path, schema: str) -> None:
    """A ledger as the node before migrations left it: a done, a running and a failed job, a cursor, an inbox."""
    db = sqlite3.connect(path)
    db.executescript(schema)
    rows = [("1.1", "done", '{"sr_sop_instance_uid": "2.25.1"}'), ("1.2", "running", "{}"), ("1.3", "failed", "{}")]
    for uid, state, result in rows:
        db.execute(
            "INSERT INTO jobs (study_instance_uid, orthanc_study_id, model_name, model_version, fingerprint, state, "
            "created, updated, result) VALUES (?, ?, 'm', '1', 'f', ?, 1.5, 2.5, ?)",
            (uid, f"o-{uid}", state, result),
        )
    db.execute("DELETE FROM jobs WHERE study_instance_uid = '1.3'")  # AUTOINCREMENT: id 3 is never reused
    db.execute("INSERT INTO cursor (name, seq) VALUES ('orthanc-changes', 4711)")
    db.execute("INSERT INTO inbox (orthanc_study_id, last_seq, received) VALUES ('o-9', 4710, 3.0)")
    db.commit()
    db.close()


@pytest.mark.parametrize("schema", [_PRE_MIGRATION_SCHEMA, _FIRST_SCHEMA], ids=["with-pending", "first-release"])
def test_a_ledger_from_before_migrations_keeps_its_jobs_and_cursor(tmp_path: Path, schema: str) -> None:
    path = tmp_path / "ledger.sqlite"
    _old_ledger(path, schema)
    ledger = Ledger(path)
    try:
        assert ledger.cursor() == 4711 and not ledger.is_new()
        assert [(j.id, j.study_instance_uid, j.state) for j in ledger.jobs()] == [
            (2, "1.2", JobStatus.RUNNING),
            (1, "1.1", JobStatus.DONE),
        ]
        done = ledger.job(1)
        assert done is not None and done.result == {"sr_sop_instance_uid": "2.25.1"} and done.created == 1.5
        assert ledger.next_inbox() == ("o-9", 4710)
        assert ledger.reclaim_expired() == [(2, "")]  # left running before leases existed: run again
        assert _create(ledger, "1.1")[1] is False  # the key still holds: no second result for an old study
        assert _create(ledger, "1.4")[0].id > 3
        ledger.receive([], cursor=None, changed=["o-10"])  # pending exists, even in the first release's file
        with ledger.engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == _head()
    finally:
        ledger.close()
    reopened = Ledger(path)  # the stamped file opens as any other
    assert reopened.cursor() == 4711 and len(reopened.jobs()) == 3
    reopened.close()


# -- SQLite's own: quick_check at start, online backups ------------------------------------------------------------


def _ledger_with_jobs(path: Path, jobs: int) -> None:
    ledger = Ledger(path)
    for n in range(jobs):
        _create(ledger, f"1.2.{n}")
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
    _create(ledger, "1.2.3")
    copies = []
    for _ in range(3):
        copies.append(ledger.backup(tmp_path / "backups", keep=2))
        time.sleep(1.05)  # one copy per second at most (names carry the time)
    ledger.close()
    kept = sorted((tmp_path / "backups").glob("ledger-*.sqlite"))
    assert kept == copies[1:]
    restored = Ledger(kept[-1])
    assert [j.study_instance_uid for j in restored.jobs(state=JobStatus.QUEUED)] == ["1.2.3"]
    restored.close()


def test_a_failed_backup_leaves_no_partial_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "ledger-20000101T000000Z.sqlite").mkdir()  # a directory where the copy's name would go: fails
    monkeypatch.setattr(time, "strftime", lambda *_: "ledger-20000101T000000Z.sqlite")
    try:
        with pytest.raises((OSError, LedgerError)):
            ledger.backup(backups, keep=2)
    finally:
        ledger.close()
    assert not list(backups.glob("*.partial"))


def test_sqlite_ledgers_run_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        with ledger.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert sa.inspect(connection).get_table_names() == sorted([*metadata.tables, "alembic_version"])
    finally:
        ledger.close()


def test_the_node_setting_chooses_the_database_and_keeps_the_password_out_of_repr(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nstate_dir = "/srv/radfed"\ndatabase_url = "postgresql+psycopg://radfed:s3cret@db/radfed"\n'
    )
    chosen = load_config(config, {"RADFED_API_TOKEN": "t"})
    assert chosen.ledger_location == "postgresql+psycopg://radfed:s3cret@db/radfed" and "s3cret" not in repr(chosen)
    assert load_config(None, {"RADFED_API_TOKEN": "t", "RADFED_STATE_DIR": "/srv"}).ledger_location == Path(
        "/srv/ledger.sqlite"
    )
    with pytest.raises(ConfigError, match=r"database_url must be .* got mysql"):
        load_config(None, {"RADFED_API_TOKEN": "t", "RADFED_DATABASE_URL": "mysql://root:pw@db/radfed"})


def test_a_worker_claims_only_its_models_jobs(ledger: Ledger) -> None:
    old, _ = _create(ledger, "1", version="1")
    new, _ = _create(ledger, "2", version="2")
    claimed = ledger.claim("a", model=("m", "2"))
    assert claimed is not None and claimed.id == new.id
    assert ledger.claim("a", model=("m", "2")) is None  # version 1's job waits for a worker that serves it
    other = ledger.claim("b")
    assert other is not None and other.id == old.id
