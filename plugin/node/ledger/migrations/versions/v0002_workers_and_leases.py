"""Several workers on one queue: a job's lease (who runs it, until when) and the workers' heartbeats.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_SECONDS: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lease_owner", sa.Text, nullable=False, server_default=""))
    op.add_column("jobs", sa.Column("lease_expires", _SECONDS, nullable=False, server_default=sa.text("0")))
    op.create_index("jobs_lease", "jobs", ["state", "lease_expires"])
    op.create_table(
        "workers",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("device", sa.Text, nullable=False, server_default=""),
        sa.Column("started", _SECONDS, nullable=False),
        sa.Column("last_seen", _SECONDS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("jobs_lease", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:  # SQLite cannot drop a column in place before 3.35
        batch.drop_column("lease_expires")
        batch.drop_column("lease_owner")
