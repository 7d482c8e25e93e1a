"""The ledger's schema migrations (Alembic), run by the node at start-up (``radfed.plugin.node.ledger.engine``).

Every schema change is a new file in ``versions/``: ``revision`` the next number, ``down_revision`` the newest one
before it, ``upgrade()`` with Alembic's ``op`` (``op.batch_alter_table`` where SQLite cannot ALTER), and the tables
in ``ledger/schema.py`` changed to match. A migration is frozen once shipped: it never imports ``schema.py``.
"""

from pathlib import Path

LOCATION = Path(__file__).parent
BASELINE = "0001"  # the schema of the ledgers made before migrations existed (SQLite only)
