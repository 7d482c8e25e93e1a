"""A job keeps its input plan: the series and instances it loads, planned once when the study was examined.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # "{}" for the jobs of older revisions: such a job plans its study again when it runs
    op.add_column("jobs", sa.Column("plan", sa.Text, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite cannot drop a column in place before 3.35
        batch.drop_column("plan")
