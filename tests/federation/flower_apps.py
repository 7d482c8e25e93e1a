"""Flower app folders for tests: the shipped app with a test ClientApp in place of radfed's."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def recording_app(tmp_path: Path) -> Path:
    """The Flower app with the test ClientApp that describes every reply it sends (no fault injected)."""
    app = tmp_path / "flower-app"
    shutil.copytree(ROOT / "deploy" / "flower", app)
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text().replace(
        "radfed.federation.site.client_app:app", "tests.federation.poisoned_client_app:app"
    )
    pyproject.write_text(text)
    return app
