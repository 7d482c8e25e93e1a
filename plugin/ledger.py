"""The durable job ledger (SQLite in WAL mode).

Three tables: the ``/changes`` cursor, an inbox of stable studies waiting to be examined, and jobs keyed
by (StudyInstanceUID, model name, model version, input fingerprint). That key makes results exactly
once: a repeated StableStudy, our own results arriving, or a restart find the existing job; late
instances change the fingerprint and give a new, superseding job. A crash leaves jobs ``running``;
start-up puts them back in the queue (result UIDs are deterministic, so a re-run overwrites).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from radfed.inference.errors import RadfedError


class LedgerError(RadfedError, RuntimeError):
    """The ledger file cannot be used; the message names the file and what to do."""


_SCHEMA = """
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


_RECOVERY = (
    "Stop the node, then either copy the newest backup (state folder, backups/ledger-*.sqlite) over it, or move "
    "it aside to start with an empty ledger (the node then starts from Orthanc's current changes; use "
    "`radfed serve --reprocess-since DATE` to run older studies again)."
)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Job:
    id: int
    study_instance_uid: str
    orthanc_study_id: str
    model_name: str
    model_version: str
    fingerprint: str
    state: JobState
    reason: str
    failure_kind: str
    attempts: int
    created: float
    updated: float
    timings: dict[str, float]
    selection: list[str]
    result: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "study_instance_uid": self.study_instance_uid,
            "orthanc_study_id": self.orthanc_study_id,
            "model": f"{self.model_name}:{self.model_version}",
            "fingerprint": self.fingerprint,
            "state": self.state.value,
            "reason": self.reason,
            "failure_kind": self.failure_kind,
            "attempts": self.attempts,
            "created": self.created,
            "updated": self.updated,
            "timings_s": self.timings,
            "selection": self.selection,
            "result": self.result,
        }


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        study_instance_uid=row["study_instance_uid"],
        orthanc_study_id=row["orthanc_study_id"],
        model_name=row["model_name"],
        model_version=row["model_version"],
        fingerprint=row["fingerprint"],
        state=JobState(row["state"]),
        reason=row["reason"],
        failure_kind=row["failure_kind"],
        attempts=row["attempts"],
        created=row["created"],
        updated=row["updated"],
        timings=json.loads(row["timings"]),
        selection=json.loads(row["selection"]),
        result=json.loads(row["result"]),
    )


class Ledger:
    """Thread-safe access (one connection, serialised) to the ledger file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            problems = [str(row[0]) for row in self._db.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                self._db.close()
                raise LedgerError(f"{path} is damaged ({'; '.join(problems)}). {_RECOVERY}")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{path} cannot be opened as a ledger ({exc}). {_RECOVERY}") from exc

    def probe_write(self) -> None:
        """A small write transaction (readiness: a full disk or a read-only file shows here)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO cursor (name, seq) VALUES ('readiness-probe', ?) "
                "ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
                (int(time.time()),),
            )

    def backup(self, folder: Path, keep: int) -> Path:
        """An online copy (SQLite's backup API: consistent while the node writes) named by UTC time; only the
        newest ``keep`` copies stay."""
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / time.strftime("ledger-%Y%m%dT%H%M%SZ.sqlite", time.gmtime())
        partial = target.with_suffix(".partial")
        try:
            copy = sqlite3.connect(partial)
            try:
                with self._lock:
                    self._db.backup(copy)
            finally:
                copy.close()
            partial.replace(target)
        except BaseException:
            partial.unlink(missing_ok=True)  # a full disk must not fill the folder with partial copies
            raise
        for old in sorted(folder.glob("ledger-*.sqlite"))[:-keep] if keep > 0 else []:
            old.unlink(missing_ok=True)
        return target

    def is_new(self) -> bool:
        """True when the ledger has never followed Orthanc (no cursor, no job): a fresh or lost ledger."""
        with self._lock:
            cursors = self._db.execute("SELECT COUNT(*) FROM cursor WHERE name = 'orthanc-changes'").fetchone()[0]
            jobs = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return not cursors and not jobs

    def set_cursor(self, seq: int, name: str = "orthanc-changes") -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO cursor (name, seq) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
                (name, seq),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- the /changes cursor and the inbox ---------------------------------------------------------

    def cursor(self, name: str = "orthanc-changes") -> int:
        with self._lock:
            row = self._db.execute("SELECT seq FROM cursor WHERE name = ?", (name,)).fetchone()
        return int(row["seq"]) if row else 0

    def receive(
        self,
        orthanc_study_ids: list[tuple[str, int]],
        cursor: int | None,
        name: str = "orthanc-changes",
        *,
        changed: list[str] | None = None,
    ) -> None:
        """Put stable studies in the inbox and advance the cursor, atomically (nothing is missed). Studies
        that ``changed`` (new study or series) wait in ``pending`` until their StableStudy arrives."""
        now = time.time()
        with self._transaction() as db:
            for study_id in changed or ():
                db.execute(
                    "INSERT INTO pending (orthanc_study_id, last_seen) VALUES (?, ?) "
                    "ON CONFLICT (orthanc_study_id) DO UPDATE SET last_seen = excluded.last_seen",
                    (study_id, now),
                )
            for study_id, _ in orthanc_study_ids:
                db.execute("DELETE FROM pending WHERE orthanc_study_id = ?", (study_id,))
            for study_id, seq in orthanc_study_ids:
                db.execute(
                    "INSERT INTO inbox (orthanc_study_id, last_seq, received) VALUES (?, ?, ?) "
                    "ON CONFLICT (orthanc_study_id) DO UPDATE SET last_seq = excluded.last_seq, not_before = 0",
                    (study_id, seq, now),
                )
            if cursor is not None:
                db.execute(
                    "INSERT INTO cursor (name, seq) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
                    (name, cursor),
                )

    def quiet_pending(self, quiet_s: float) -> list[str]:
        """Studies that changed and then stayed quiet for ``quiet_s`` without a StableStudy (Orthanc computes
        stability in memory: a crash inside StableAge loses the event)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT orthanc_study_id FROM pending WHERE last_seen <= ? ORDER BY last_seen", (time.time() - quiet_s,)
            ).fetchall()
        return [str(row["orthanc_study_id"]) for row in rows]

    def settle_pending(self, examine: list[str], forget: list[str], wait: list[str]) -> None:
        """Pending studies to examine (into the inbox), to forget (gone), or to wait for again."""
        now = time.time()
        with self._transaction() as db:
            for study_id in examine:
                db.execute(
                    "INSERT INTO inbox (orthanc_study_id, last_seq, received) VALUES (?, -1, ?) "
                    "ON CONFLICT (orthanc_study_id) DO NOTHING",
                    (study_id, now),
                )
            for study_id in [*examine, *forget]:
                db.execute("DELETE FROM pending WHERE orthanc_study_id = ?", (study_id,))
            for study_id in wait:
                db.execute("UPDATE pending SET last_seen = ? WHERE orthanc_study_id = ?", (now, study_id))

    def next_inbox(self) -> tuple[str, int] | None:
        """The oldest inbox study that may be examined now (its row stays until ``inbox_done``)."""
        with self._lock:
            row = self._db.execute(
                "SELECT orthanc_study_id, last_seq FROM inbox WHERE not_before <= ? ORDER BY received LIMIT 1",
                (time.time(),),
            ).fetchone()
        return (row["orthanc_study_id"], row["last_seq"]) if row else None

    def inbox_done(self, orthanc_study_id: str, seq: int) -> None:
        """Remove an examined study, unless a newer StableStudy arrived for it meanwhile."""
        with self._transaction() as db:
            db.execute("DELETE FROM inbox WHERE orthanc_study_id = ? AND last_seq = ?", (orthanc_study_id, seq))

    def inbox_retry(self, orthanc_study_id: str, delay_s: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE inbox SET not_before = ?, attempts = attempts + 1 WHERE orthanc_study_id = ?",
                (time.time() + delay_s, orthanc_study_id),
            )

    def inbox_depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])

    # -- jobs ----------------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        study_instance_uid: str,
        orthanc_study_id: str,
        model_name: str,
        model_version: str,
        fingerprint: str,
        state: JobState = JobState.QUEUED,
        reason: str = "",
        failure_kind: str = "",
        selection: list[str] | None = None,
    ) -> tuple[Job, bool]:
        """Create the job for this key, or return the existing one (``created`` False)."""
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO jobs (study_instance_uid, orthanc_study_id, model_name, model_version, "
                "fingerprint, state, reason, failure_kind, created, updated, selection) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    study_instance_uid, orthanc_study_id, model_name, model_version, fingerprint,
                    state.value, reason, failure_kind, now, now, json.dumps(selection or []),
                ),
            )  # fmt: skip
            created = cursor.rowcount == 1
            row = db.execute(
                "SELECT * FROM jobs WHERE study_instance_uid = ? AND model_name = ? AND model_version = ? "
                "AND fingerprint = ?",
                (study_instance_uid, model_name, model_version, fingerprint),
            ).fetchone()
        return _job(row), created

    def claim(self) -> Job | None:
        """Atomically take the oldest runnable queued job and mark it running."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE state = ? AND not_before <= ? ORDER BY id LIMIT 1",
                (JobState.QUEUED.value, time.time()),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, updated = ? WHERE id = ?",
                (JobState.RUNNING.value, time.time(), row["id"]),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return _job(row)

    def finish(
        self,
        job_id: int,
        state: JobState,
        *,
        reason: str = "",
        failure_kind: str = "",
        timings: dict[str, float] | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, failure_kind = ?, timings = ?, result = ?, updated = ? "
                "WHERE id = ?",
                (
                    state.value,
                    reason,
                    failure_kind,
                    json.dumps(timings or {}),
                    json.dumps(result or {}),
                    time.time(),
                    job_id,
                ),
            )

    def requeue(self, job_id: int, delay_s: float, reason: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, not_before = ?, reason = ?, updated = ? WHERE id = ?",
                (JobState.QUEUED.value, time.time() + delay_s, reason, time.time(), job_id),
            )

    def recover_running(self) -> int:
        """After a crash: jobs left running go back to the queue."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, reason = 'requeued after restart', updated = ? WHERE state = ?",
                (JobState.QUEUED.value, time.time(), JobState.RUNNING.value),
            )
            return cursor.rowcount

    def retry(self, job_id: int) -> Job | None:
        """An admin's retry of a failed or skipped job."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, not_before = 0, reason = 'retry requested', updated = ? "
                "WHERE id = ? AND state IN (?, ?)",
                (JobState.QUEUED.value, time.time(), job_id, JobState.FAILED.value, JobState.SKIPPED.value),
            )
        return self.job(job_id)

    def job(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(
        self, *, state: JobState | None = None, study_instance_uid: str | None = None, limit: int = 100
    ) -> list[Job]:
        clauses, params = [], []
        if state is not None:
            clauses.append("state = ?")
            params.append(state.value)
        if study_instance_uid is not None:
            clauses.append("study_instance_uid = ?")
            params.append(study_instance_uid)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
        return [_job(r) for r in rows]

    def previous_done(self, study_instance_uid: str, model_name: str, exclude_job: int) -> Job | None:
        """The latest completed result for the study by this model (any version or input), to supersede."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE study_instance_uid = ? AND model_name = ? AND state = ? AND id != ? "
                "ORDER BY updated DESC LIMIT 1",
                (study_instance_uid, model_name, JobState.DONE.value, exclude_job),
            ).fetchone()
        return _job(row) if row else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {row["state"]: row["n"] for row in rows}

    def failure_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT failure_kind, COUNT(*) AS n FROM jobs WHERE state = ? GROUP BY failure_kind",
                (JobState.FAILED.value,),
            ).fetchall()
        return {row["failure_kind"]: row["n"] for row in rows}
