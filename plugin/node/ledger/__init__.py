"""The durable job ledger: queries, engine (SQLite or PostgreSQL) and Alembic migrations."""
