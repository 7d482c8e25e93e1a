"""The ledger as it was before migrations: the /changes cursor, the inbox, jobs and pending studies.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_SECONDS: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")
_SEQUENCE: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_KEY_AND_STATE = ("study_instance_uid", "orthanc_study_id", "model_name", "model_version", "fingerprint", "state")


def upgrade() -> None:
    op.create_table("cursor", sa.Column("name", sa.Text, primary_key=True), sa.Column("seq", _SEQUENCE, nullable=False))
    op.create_table(
        "inbox",
        sa.Column("orthanc_study_id", sa.Text, primary_key=True),
        sa.Column("last_seq", _SEQUENCE, nullable=False),
        sa.Column("received", _SECONDS, nullable=False),
        sa.Column("not_before", _SECONDS, nullable=False, server_default=sa.text("0")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        *(sa.Column(name, sa.Text, nullable=False) for name in _KEY_AND_STATE),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("failure_kind", sa.Text, nullable=False, server_default=""),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("not_before", _SECONDS, nullable=False, server_default=sa.text("0")),
        sa.Column("created", _SECONDS, nullable=False),
        sa.Column("updated", _SECONDS, nullable=False),
        sa.Column("timings", sa.Text, nullable=False, server_default="{}"),
        sa.Column("selection", sa.Text, nullable=False, server_default="[]"),
        sa.Column("result", sa.Text, nullable=False, server_default="{}"),
        sa.UniqueConstraint("study_instance_uid", "model_name", "model_version", "fingerprint", name="jobs_key"),
        sqlite_autoincrement=True,
    )
    op.create_index("jobs_state", "jobs", ["state", "not_before"])
    op.create_table(
        "pending",
        sa.Column("orthanc_study_id", sa.Text, primary_key=True),
        sa.Column("last_seen", _SECONDS, nullable=False),
    )


def downgrade() -> None:
    for table in ("pending", "jobs", "inbox", "cursor"):
        op.drop_table(table)
