"""The durable job ledger (SQLAlchemy Core: a SQLite file in WAL mode by default, or PostgreSQL).

Four tables: the ``/changes`` cursor, an inbox of stable studies waiting to be examined, studies that changed
and wait for their StableStudy (``pending``), and jobs keyed by (StudyInstanceUID, model name, model version,
input fingerprint). That key makes results exactly once: a repeated StableStudy, our own results arriving, or a
restart find the existing job; late instances change the fingerprint and give a new, superseding job. A crash
leaves jobs ``running``; start-up puts them back in the queue (result UIDs are deterministic, so a re-run
overwrites). The schema is made by the migrations (``ledger/migrations``); see ``ledger/engine.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from radfed.plugin.node.ledger.engine import LedgerBackend, LedgerError, backup_sqlite, open_database
from radfed.plugin.node.ledger.schema import cursor as cursors
from radfed.plugin.node.ledger.schema import inbox, jobs, pending, workers

__all__ = ["DEFAULT_LEASE_S", "Job", "JobStatus", "Ledger", "LedgerBackend", "LedgerError", "Worker"]

_CHANGES = "orthanc-changes"
DEFAULT_LEASE_S = 30.0  # a running job whose worker has not renewed its lease for this long is run again
_FORGET_WORKERS_S = 86400.0  # workers silent this long leave the list


class JobStatus(StrEnum):
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
    state: JobStatus
    reason: str
    failure_kind: str
    attempts: int
    created: float
    updated: float
    timings: dict[str, float]
    selection: list[str]
    result: dict[str, Any]
    worker: str  # the worker that holds (or last held) the job's lease
    plan: dict[str, Any] = field(default_factory=dict, repr=False)  # InputPlan.to_json(): what the job loads

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
            "worker": self.worker,
        }


@dataclass(frozen=True)
class Worker:
    """A node process as it last reported itself (its role, and the device it runs jobs on)."""

    id: str
    host: str
    pid: int
    role: str
    device: str
    started: float
    last_seen: float

    def as_dict(self, lease_s: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "role": self.role,
            "device": self.device,
            "started": self.started,
            "last_seen": self.last_seen,
            "alive": time.time() - self.last_seen < lease_s,
        }


def _job(row: sa.RowMapping) -> Job:
    return Job(
        id=row["id"],
        study_instance_uid=row["study_instance_uid"],
        orthanc_study_id=row["orthanc_study_id"],
        model_name=row["model_name"],
        model_version=row["model_version"],
        fingerprint=row["fingerprint"],
        state=JobStatus(row["state"]),
        reason=row["reason"],
        failure_kind=row["failure_kind"],
        attempts=row["attempts"],
        created=row["created"],
        updated=row["updated"],
        timings=json.loads(row["timings"]),
        selection=json.loads(row["selection"]),
        result=json.loads(row["result"]),
        worker=row["lease_owner"],
        plan=json.loads(row["plan"]),
    )


class Ledger:
    """Thread-safe access to the ledger: every method is one transaction on a pooled connection.

    ``location`` is a SQLite file's path or a database URL (``NodeConfig.ledger_location``).
    """

    def __init__(self, location: Path | str) -> None:
        self._db = open_database(location)
        self.backend = self._db.backend
        self.name = self._db.name
        self._insert = postgresql.insert if self.backend is LedgerBackend.POSTGRESQL else sqlite.insert

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine (tests inject faults through its events)."""
        return self._db.engine

    def probe_write(self) -> None:
        """A small write transaction (readiness: a full disk or a read-only database shows here)."""
        self.set_cursor(int(time.time()), "readiness-probe")

    def backup(self, folder: Path, keep: int) -> Path:
        """An online copy of a SQLite ledger (see :func:`backup_sqlite`). A PostgreSQL ledger is backed up by its
        server's tools (pg_dump, WAL archiving), not by the node."""
        if self.backend is not LedgerBackend.SQLITE:
            raise LedgerError(f"ledger {self.name}: node backups are for SQLite; back PostgreSQL up with pg_dump")
        return backup_sqlite(self._db, folder, keep)

    def is_new(self) -> bool:
        """True when the ledger has never followed Orthanc (no cursor, no job): a fresh or lost ledger."""
        with self._read() as db:
            followed = db.scalar(sa.select(sa.func.count()).select_from(cursors).where(cursors.c.name == _CHANGES))
            created = db.scalar(sa.select(sa.func.count()).select_from(jobs))
        return not followed and not created

    def set_cursor(self, seq: int, name: str = _CHANGES) -> None:
        with self._write() as db:
            db.execute(self._set_cursor(name, seq))

    def close(self) -> None:
        self._db.close()

    def _set_cursor(self, name: str, seq: int) -> sa.Executable:
        statement = self._insert(cursors).values(name=name, seq=seq)
        return statement.on_conflict_do_update(index_elements=[cursors.c.name], set_={"seq": statement.excluded.seq})

    def _write(self) -> AbstractContextManager[sa.Connection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE, so writers queue at the start and never deadlock)."""
        return self._transaction(self._db.writer, "a write")

    def _read(self) -> AbstractContextManager[sa.Connection]:
        return self._transaction(self._db.engine, "a read")

    @contextmanager
    def _transaction(self, engine: sa.Engine, doing: str) -> Iterator[sa.Connection]:
        try:
            with engine.begin() as connection:
                yield connection
        except sa.exc.SQLAlchemyError as exc:
            raise self._db.error(exc, doing) from exc

    # -- the /changes cursor and the inbox ---------------------------------------------------------

    def cursor(self, name: str = _CHANGES) -> int:
        with self._read() as db:
            seq = db.scalar(sa.select(cursors.c.seq).where(cursors.c.name == name))
        return int(seq) if seq is not None else 0

    def receive(
        self,
        orthanc_study_ids: list[tuple[str, int]],
        cursor: int | None,
        name: str = _CHANGES,
        *,
        changed: list[str] | None = None,
    ) -> None:
        """Put stable studies in the inbox and advance the cursor, atomically (nothing is missed). Studies
        that ``changed`` (new study or series) wait in ``pending`` until their StableStudy arrives."""
        now = time.time()
        with self._write() as db:
            for study_id in changed or ():
                seen = self._insert(pending).values(orthanc_study_id=study_id, last_seen=now)
                db.execute(
                    seen.on_conflict_do_update(
                        index_elements=[pending.c.orthanc_study_id], set_={"last_seen": seen.excluded.last_seen}
                    )
                )
            for study_id, _ in orthanc_study_ids:
                db.execute(sa.delete(pending).where(pending.c.orthanc_study_id == study_id))
            for study_id, seq in orthanc_study_ids:
                stable = self._insert(inbox).values(orthanc_study_id=study_id, last_seq=seq, received=now)
                db.execute(
                    stable.on_conflict_do_update(
                        index_elements=[inbox.c.orthanc_study_id],
                        set_={"last_seq": stable.excluded.last_seq, "not_before": 0},
                    )
                )
            if cursor is not None:
                db.execute(self._set_cursor(name, cursor))

    def quiet_pending(self, quiet_s: float) -> list[str]:
        """Studies that changed and then stayed quiet for ``quiet_s`` without a StableStudy (Orthanc computes
        stability in memory: a crash inside StableAge loses the event)."""
        with self._read() as db:
            rows = db.scalars(
                sa.select(pending.c.orthanc_study_id)
                .where(pending.c.last_seen <= time.time() - quiet_s)
                .order_by(pending.c.last_seen)
            ).all()
        return [str(row) for row in rows]

    def settle_pending(self, examine: list[str], forget: list[str], wait: list[str]) -> None:
        """Pending studies to examine (into the inbox), to forget (gone), or to wait for again."""
        now = time.time()
        with self._write() as db:
            for study_id in examine:
                db.execute(
                    self._insert(inbox)
                    .values(orthanc_study_id=study_id, last_seq=-1, received=now)
                    .on_conflict_do_nothing(index_elements=[inbox.c.orthanc_study_id])
                )
            for study_id in [*examine, *forget]:
                db.execute(sa.delete(pending).where(pending.c.orthanc_study_id == study_id))
            for study_id in wait:
                db.execute(sa.update(pending).where(pending.c.orthanc_study_id == study_id).values(last_seen=now))

    def next_inbox(self) -> tuple[str, int] | None:
        """The oldest inbox study that may be examined now (its row stays until ``inbox_done``)."""
        with self._read() as db:
            row = db.execute(
                sa.select(inbox.c.orthanc_study_id, inbox.c.last_seq)
                .where(inbox.c.not_before <= time.time())
                .order_by(inbox.c.received, inbox.c.last_seq)  # one batch: in change order
                .limit(1)
            ).first()
        return (str(row.orthanc_study_id), int(row.last_seq)) if row else None

    def inbox_done(self, orthanc_study_id: str, seq: int) -> None:
        """Remove an examined study, unless a newer StableStudy arrived for it meanwhile."""
        with self._write() as db:
            db.execute(sa.delete(inbox).where(inbox.c.orthanc_study_id == orthanc_study_id, inbox.c.last_seq == seq))

    def inbox_retry(self, orthanc_study_id: str, delay_s: float) -> None:
        with self._write() as db:
            db.execute(
                sa.update(inbox)
                .where(inbox.c.orthanc_study_id == orthanc_study_id)
                .values(not_before=time.time() + delay_s, attempts=inbox.c.attempts + 1)
            )

    def inbox_depth(self) -> int:
        with self._read() as db:
            return int(db.scalar(sa.select(sa.func.count()).select_from(inbox)) or 0)

    # -- jobs ----------------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        study_instance_uid: str,
        orthanc_study_id: str,
        model_name: str,
        model_version: str,
        fingerprint: str,
        state: JobStatus = JobStatus.QUEUED,
        reason: str = "",
        failure_kind: str = "",
        selection: list[str] | None = None,
        plan: dict[str, Any] | None = None,
    ) -> tuple[Job, bool]:
        """Create the job for this key, or return the existing one (``created`` False)."""
        now = time.time()
        key = {
            "study_instance_uid": study_instance_uid,
            "model_name": model_name,
            "model_version": model_version,
            "fingerprint": fingerprint,
        }
        with self._write() as db:
            inserted = db.execute(
                self._insert(jobs)
                .values(
                    **key, orthanc_study_id=orthanc_study_id, state=state.value, reason=reason,
                    failure_kind=failure_kind, created=now, updated=now, selection=json.dumps(selection or []),
                    plan=json.dumps(plan or {}),
                )
                .on_conflict_do_nothing(index_elements=list(key))
                .returning(jobs.c.id)
            ).first()  # fmt: skip
            row = db.execute(sa.select(jobs).filter_by(**key)).mappings().one()
        return _job(row), inserted is not None

    def claim(
        self, worker: str = "", lease_s: float = DEFAULT_LEASE_S, model: tuple[str, str] | None = None
    ) -> Job | None:
        """Atomically take the oldest runnable queued job (for ``model``, a name and version, when given) and mark it
        running, leased to ``worker`` for ``lease_s`` (renewed by :meth:`heartbeat`). Concurrent claimers never get
        the same job: PostgreSQL skips rows another transaction has locked (FOR UPDATE SKIP LOCKED), SQLite lets one
        writer in at a time."""
        now = time.time()
        runnable = sa.select(jobs.c.id).where(jobs.c.state == JobStatus.QUEUED.value, jobs.c.not_before <= now)
        if model is not None:
            runnable = runnable.where(jobs.c.model_name == model[0], jobs.c.model_version == model[1])
        with self._write() as db:
            job_id = db.scalar(runnable.order_by(jobs.c.id).limit(1).with_for_update(skip_locked=True))
            if job_id is None:
                return None
            row = (
                db.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(
                        state=JobStatus.RUNNING.value,
                        attempts=jobs.c.attempts + 1,
                        updated=now,
                        lease_owner=worker,
                        lease_expires=now + lease_s,
                    )
                    .returning(*jobs.c)
                )
                .mappings()
                .one()
            )
        return _job(row)

    def finish(
        self,
        job_id: int,
        state: JobStatus,
        *,
        reason: str = "",
        failure_kind: str = "",
        timings: dict[str, float] | None = None,
        result: dict[str, Any] | None = None,
        worker: str | None = None,
        attempt: int | None = None,
    ) -> bool:
        """Record a job's outcome. With ``worker``, only while that worker still holds the running job's lease: a
        worker presumed dead whose job was run again does not overwrite the record (its results carry the same
        UIDs). With ``attempt`` (the claimed job's ``attempts``), only while that claim holds it: the worker id is
        its process's, and another of the process's threads may have claimed the job again after its lease expired.
        False when the record was not written."""
        return self._update_job(
            job_id,
            worker,
            attempt,
            state=state.value,
            reason=reason,
            failure_kind=failure_kind,
            timings=json.dumps(timings or {}),
            result=json.dumps(result or {}),
            lease_expires=0,
        )

    def requeue(
        self, job_id: int, delay_s: float, reason: str, worker: str | None = None, attempt: int | None = None
    ) -> bool:
        """Back to the queue after ``delay_s``; ``worker`` and ``attempt`` fence as in :meth:`finish`."""
        return self._update_job(
            job_id, worker, attempt, state=JobStatus.QUEUED.value, not_before=time.time() + delay_s, reason=reason
        )

    def _update_job(self, job_id: int, worker: str | None, attempt: int | None, **values: Any) -> bool:
        query = sa.update(jobs).where(jobs.c.id == job_id)
        if worker is not None:
            query = query.where(jobs.c.state == JobStatus.RUNNING.value, jobs.c.lease_owner == worker)
        if attempt is not None:
            query = query.where(jobs.c.attempts == attempt)
        with self._write() as db:
            return db.execute(query.values(**values, updated=time.time())).rowcount == 1

    # -- workers and their leases --------------------------------------------------------------------

    def heartbeat(self, worker: Worker, lease_s: float) -> int:
        """``worker`` is alive: its row is refreshed and the leases of the jobs it runs extended by ``lease_s``.
        Returns how many jobs it holds."""
        now = time.time()
        with self._write() as db:
            row = self._insert(workers).values(
                id=worker.id, host=worker.host, pid=worker.pid, role=worker.role, device=worker.device,
                started=worker.started, last_seen=now,
            )  # fmt: skip
            db.execute(
                row.on_conflict_do_update(
                    index_elements=[workers.c.id], set_={"last_seen": now, "device": row.excluded.device}
                )
            )
            return db.execute(
                sa.update(jobs)
                .where(jobs.c.state == JobStatus.RUNNING.value, jobs.c.lease_owner == worker.id)
                .values(lease_expires=now + lease_s)
            ).rowcount

    def reclaim_expired(self) -> list[tuple[int, str]]:
        """Running jobs whose worker stopped renewing the lease (killed, hung, cut off) go back to the queue; the
        (job id, worker) pairs. Jobs left running in a ledger from before leases count as expired."""
        now = time.time()
        with self._write() as db:
            expired = db.execute(
                sa.select(jobs.c.id, jobs.c.lease_owner)
                .where(jobs.c.state == JobStatus.RUNNING.value, jobs.c.lease_expires < now)
                .with_for_update(skip_locked=True)
            ).all()
            for job_id, owner in expired:
                db.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(
                        state=JobStatus.QUEUED.value,
                        not_before=0,
                        reason=f"requeued: the lease of {owner or 'a stopped node'} expired",
                        updated=now,
                    )
                )
            db.execute(sa.delete(workers).where(workers.c.last_seen < now - _FORGET_WORKERS_S))
        return [(int(job_id), str(owner)) for job_id, owner in expired]

    def workers(self) -> list[Worker]:
        with self._read() as db:
            rows = db.execute(sa.select(workers).order_by(workers.c.started)).mappings().all()
        return [Worker(**dict(row)) for row in rows]

    def retry(self, job_id: int) -> Job | None:
        """An admin's retry of a failed or skipped job."""
        with self._write() as db:
            db.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_([JobStatus.FAILED.value, JobStatus.SKIPPED.value]))
                .values(state=JobStatus.QUEUED.value, not_before=0, reason="retry requested", updated=time.time())
            )
        return self.job(job_id)

    def job(self, job_id: int) -> Job | None:
        with self._read() as db:
            row = db.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return _job(row) if row else None

    def jobs(
        self, *, state: JobStatus | None = None, study_instance_uid: str | None = None, limit: int = 100
    ) -> list[Job]:
        query = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(jobs.c.state == state.value)
        if study_instance_uid is not None:
            query = query.where(jobs.c.study_instance_uid == study_instance_uid)
        with self._read() as db:
            return [_job(row) for row in db.execute(query).mappings()]

    def previous_done(self, study_instance_uid: str, model_name: str, exclude_job: int) -> Job | None:
        """The latest completed result for the study by this model (any version or input), to supersede."""
        with self._read() as db:
            row = (
                db.execute(
                    sa.select(jobs)
                    .where(
                        jobs.c.study_instance_uid == study_instance_uid,
                        jobs.c.model_name == model_name,
                        jobs.c.state == JobStatus.DONE.value,
                        jobs.c.id != exclude_job,
                    )
                    .order_by(jobs.c.updated.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
        return _job(row) if row else None

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all()
        return {str(state): int(n) for state, n in rows}

    def failure_counts(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute(
                sa.select(jobs.c.failure_kind, sa.func.count())
                .where(jobs.c.state == JobStatus.FAILED.value)
                .group_by(jobs.c.failure_kind)
            ).all()
        return {str(kind): int(n) for kind, n in rows}
