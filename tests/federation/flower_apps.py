"""Flower app folders for tests: the shipped app with a test ClientApp in place of radfed's."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the federation-mechanics tests' network: half the default task's planned filters at each of its 5 stages
PLUMBING_FEATURES = (8, 16, 32, 64, 128)


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


def plumbing_task(folder: Path) -> Path:
    """The shipped default task with a narrower network (half the planned filters at each stage, a quarter of the
    weights) and no test-time mirroring, written to ``folder``: for the tests of federation mechanics, where the
    model's quality is not under test and its compute is most of a job's time (the default task itself runs in the
    demo and the unit tests)."""
    text = (ROOT / "inference" / "model" / "tasks" / "prostate_mpmri.toml").read_text()
    if text.count("\n[model]\n") != 1 or text.count("\nmirror = true") != 1:
        raise AssertionError("the default task's [model] table or its mirror setting moved: update plumbing_task")
    text = text.replace("\n[model]\n", f"\n[model]\nfeatures = {list(PLUMBING_FEATURES)}\n")
    text = text.replace("\nmirror = true", "\nmirror = false")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prostate_mpmri_plumbing.toml"
    path.write_text(text)
    return path
