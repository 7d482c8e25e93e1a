"""The ledger's tables as the newest migration leaves them (SQLAlchemy Core, for the queries).

The schema itself is made only by the migrations in ``migrations/versions`` (beside this module); a change here
without a new migration there is a bug (tests compare the migrated database with these tables).
"""

from __future__ import annotations

import sqlalchemy as sa

# PostgreSQL's REAL is single precision (a UNIX time to ~2 minutes): double there, REAL (8 bytes) on SQLite.
Seconds: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")
# Orthanc's change numbers are 64-bit; SQLite's INTEGER already is.
Sequence: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

cursor = sa.Table(
    "cursor",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("seq", Sequence, nullable=False),
)

inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column("orthanc_study_id", sa.Text, primary_key=True),
    sa.Column("last_seq", Sequence, nullable=False),
    sa.Column("received", Seconds, nullable=False),
    sa.Column("not_before", Seconds, nullable=False, server_default=sa.text("0")),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_instance_uid", sa.Text, nullable=False),
    sa.Column("orthanc_study_id", sa.Text, nullable=False),
    sa.Column("model_name", sa.Text, nullable=False),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("failure_kind", sa.Text, nullable=False, server_default=""),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("not_before", Seconds, nullable=False, server_default=sa.text("0")),
    sa.Column("created", Seconds, nullable=False),
    sa.Column("updated", Seconds, nullable=False),
    sa.Column("timings", sa.Text, nullable=False, server_default="{}"),
    sa.Column("selection", sa.Text, nullable=False, server_default="[]"),
    sa.Column("result", sa.Text, nullable=False, server_default="{}"),
    sa.Column(
        "plan", sa.Text, nullable=False, server_default="{}"
    ),  # the input plan (radfed.inference.pipeline.input_plan)
    # the worker that runs (or ran) the job, and until when it holds it unless it renews the lease
    sa.Column("lease_owner", sa.Text, nullable=False, server_default=""),
    sa.Column("lease_expires", Seconds, nullable=False, server_default=sa.text("0")),
    sa.UniqueConstraint("study_instance_uid", "model_name", "model_version", "fingerprint", name="jobs_key"),
    sa.Index("jobs_state", "state", "not_before"),
    sa.Index("jobs_lease", "state", "lease_expires"),
    sqlite_autoincrement=True,
)

pending = sa.Table(
    "pending",
    metadata,
    sa.Column("orthanc_study_id", sa.Text, primary_key=True),
    sa.Column("last_seen", Seconds, nullable=False),
)

# Every node process (coordinator, worker or both) and its last heartbeat.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("device", sa.Text, nullable=False, server_default=""),
    sa.Column("started", Seconds, nullable=False),
    sa.Column("last_seen", Seconds, nullable=False),
)
