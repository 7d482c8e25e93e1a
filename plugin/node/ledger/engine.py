"""Where the ledger lives, and bringing it up: a SQLite file (the default) or a PostgreSQL database.

Opening checks the database (SQLite: ``quick_check``; PostgreSQL checks its own pages) and runs the Alembic
migrations shipped in ``migrations/`` (beside this module) up to the newest, in one transaction. A SQLite ledger
made before migrations existed has no ``alembic_version`` table: it is stamped with the baseline revision (its
schema) first.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from radfed.inference.errors import RadfedError
from radfed.plugin.node.ledger.migrations import BASELINE, LOCATION


class LedgerError(RadfedError, RuntimeError):
    """The ledger cannot be used; the message names the database and what to do."""


class LedgerBackend(StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


_RECOVERY = (
    "Stop the node, then either copy the newest backup (state folder, backups/ledger-*.sqlite) over it, or move "
    "it aside to start with an empty ledger (the node then starts from Orthanc's current changes; use "
    "`radfed serve --reprocess-since DATE` to run older studies again)."
)
# The one table that the pre-migration start-up added to older files itself (CREATE TABLE IF NOT EXISTS).
_PRE_MIGRATION_PENDING = (
    "CREATE TABLE IF NOT EXISTS pending (orthanc_study_id TEXT PRIMARY KEY, last_seen REAL NOT NULL)"
)
_MIGRATION_LOCK = 0x7261646665640001  # pg_advisory_xact_lock key: processes starting together migrate one at a time
WRITE = "ledger_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE takes the write lock)


@dataclass(frozen=True)
class LedgerDatabase:
    """An open ledger database: ``writer`` begins write transactions, ``engine`` read ones."""

    engine: sa.Engine
    writer: sa.Engine
    backend: LedgerBackend
    name: str  # the file, or the server and database (never the password)

    def error(self, exc: BaseException, doing: str) -> LedgerError:
        """A database error in words: the driver's message, not SQLAlchemy's wrapping."""
        detail = getattr(exc, "orig", None) or exc
        return LedgerError(f"ledger {self.name}: {doing} failed ({type(detail).__name__}: {detail})")

    def close(self) -> None:
        self.engine.dispose()


def open_database(location: Path | str) -> LedgerDatabase:
    """Open (creating where needed), check and migrate the ledger at ``location``: a SQLite file's path, or a
    SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://user:password@host/db``)."""
    url = sa.engine.URL.create("sqlite", database=str(location)) if isinstance(location, Path) else _url(location)
    db = _open_sqlite(Path(url.database or "")) if url.get_backend_name() == "sqlite" else _open_postgresql(url)
    try:
        _migrate(db)
    except sa.exc.SQLAlchemyError as exc:
        db.close()
        raise db.error(exc, "migrating the schema") from exc
    return db


def _url(text: str) -> sa.engine.URL:
    try:
        url = sa.engine.make_url(text)
    except sa.exc.ArgumentError as exc:
        raise LedgerError(f"database_url is not a database URL ({exc})") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return url
    if url.get_backend_name() == "postgresql":
        return url.set(drivername="postgresql+psycopg")  # the driver radfed ships (psycopg 3)
    raise LedgerError(
        "database_url must be sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB, got "
        f"{url.render_as_string(hide_password=True)}"
    )


def _open_sqlite(path: Path) -> LedgerDatabase:
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        sa.engine.URL.create("sqlite", database=str(path)),
        connect_args={"check_same_thread": False, "timeout": 30},
    )

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi: sqlite3.Connection, _: Any) -> None:
        dbapi.isolation_level = None  # pysqlite's own BEGINs off: the "begin" hook below says when and how
        dbapi.execute("PRAGMA journal_mode=WAL")
        dbapi.execute("PRAGMA synchronous=FULL")

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get(WRITE) else "BEGIN")

    db = LedgerDatabase(engine, engine.execution_options(**{WRITE: True}), LedgerBackend.SQLITE, str(path))
    try:
        with engine.connect() as connection:
            problems = [str(row[0]) for row in connection.exec_driver_sql("PRAGMA quick_check(5)")]
    except sa.exc.SQLAlchemyError as exc:
        db.close()
        raise LedgerError(f"{path} cannot be opened as a ledger ({getattr(exc, 'orig', exc)}). {_RECOVERY}") from exc
    if problems != ["ok"]:
        db.close()
        raise LedgerError(f"{path} is damaged ({'; '.join(problems)}). {_RECOVERY}")
    return db


def _open_postgresql(url: sa.engine.URL) -> LedgerDatabase:
    name = url.render_as_string(hide_password=True)
    engine = sa.create_engine(url, pool_pre_ping=True)  # a restarted server leaves dead pooled connections
    db = LedgerDatabase(engine, engine.execution_options(**{WRITE: True}), LedgerBackend.POSTGRESQL, name)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        db.close()
        raise LedgerError(
            f"the PostgreSQL ledger {name} cannot be reached ({getattr(exc, 'orig', exc)}); check database_url, "
            "the server and its pg_hba.conf"
        ) from exc
    return db


def _migrate(db: LedgerDatabase) -> None:
    config = Config()
    config.set_main_option("script_location", str(LOCATION))
    with db.writer.begin() as connection:
        if db.backend is LedgerBackend.POSTGRESQL:
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        tables = set(sa.inspect(connection).get_table_names())
        if db.backend is LedgerBackend.SQLITE and "jobs" in tables and "alembic_version" not in tables:
            connection.exec_driver_sql(_PRE_MIGRATION_PENDING)
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")


def backup_sqlite(db: LedgerDatabase, folder: Path, keep: int) -> Path:
    """An online copy (SQLite's backup API: consistent while the node writes) named by UTC time; only the newest
    ``keep`` copies stay."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / time.strftime("ledger-%Y%m%dT%H%M%SZ.sqlite", time.gmtime())
    partial = target.with_suffix(".partial")
    try:
        copy = sqlite3.connect(partial)
        try:
            with db.engine.connect() as connection:
                source = connection.connection.driver_connection
                assert isinstance(source, sqlite3.Connection)
                source.backup(copy)
        finally:
            copy.close()
        partial.replace(target)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise db.error(exc, "the backup") from exc
    except BaseException:
        partial.unlink(missing_ok=True)  # a full disk must not fill the folder with partial copies
        raise
    for old in sorted(folder.glob("ledger-*.sqlite"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return target
