"""Alembic's environment: migrations run on the connection (and inside the transaction) the ledger hands over."""

from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():  # a no-op inside the caller's transaction, which commits or rolls back
    context.run_migrations()
