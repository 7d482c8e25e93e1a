"""Shared fixtures: real Orthanc servers on loopback, synthetic studies, paths to shared data."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancOptions, OrthancProcess, start_orthanc
from radfed.inference.testing.synthetic.sites import site_profile
from radfed.inference.testing.synthetic.study import SyntheticStudy, render_study
from tests.postgres_server import PostgresServer, start_postgres

REPO_ROOT = Path(__file__).resolve().parents[1]
_DATABASES = itertools.count()

# A test that starts Orthanc through these fixtures (directly or through another fixture) is marked ``orthanc``
# here, so the marker cannot be forgotten; modules that start Orthanc, Flower or a browser themselves say so with
# ``pytestmark``, and tests that run dciodvfy / dcmqi with ``@pytest.mark.validators``.
_FIXTURE_MARKERS = {"orthanc_factory": "orthanc"}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in set(getattr(item, "fixturenames", ())) & _FIXTURE_MARKERS.keys():
            item.add_marker(_FIXTURE_MARKERS[fixture])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (CI clones main with shared/ next to it)."""
    path = Path(os.environ.get("RADFED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"shared test data not found at {path} (set RADFED_SHARED_DATA)")
    return path


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancProcess]]:
    """Start real Orthanc servers (Debian package); all are stopped at teardown.

    A missing binary or a failed start fails the test with Orthanc's own log lines: never a skip.
    """
    started: list[OrthancProcess] = []

    def start(name: str = "orthanc", **options: object) -> OrthancProcess:
        aet = name.upper().replace("-", "")[:16]
        instance = start_orthanc(tmp_path / name, OrthancOptions(name=name, aet=aet, **options))  # type: ignore[arg-type]
        started.append(instance)
        return instance

    yield start
    # SIGKILL: a test's Orthanc and its storage are thrown away, and a graceful stop costs ~3 s each (115 tests
    # use one); the tests of a clean stop and restart call stop() or restart() themselves
    for instance in started:
        instance.kill()


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancProcess]) -> OrthancProcess:
    return orthanc_factory("orthanc")


@pytest.fixture
def orthanc_client(orthanc: OrthancProcess) -> Iterator[OrthancClient]:
    with OrthancClient(orthanc.endpoint) as client:
        yield client


@pytest.fixture(scope="session")
def small_study() -> SyntheticStudy:
    """A small (half-matrix) study with lesions from site 2 (a GE-like site)."""
    site = site_profile(2, small=True)
    for number in range(1, 20):
        study = render_study(site, number, seed=11)
        if study.phantom.lesions:
            return study
    raise AssertionError("no study with lesions in the first 19 of seed 11")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small sites x three studies, written as ``radfed synth`` writes them."""
    from radfed.inference.testing.synthetic.writer import synthesize_to_folder

    root = tmp_path_factory.mktemp("synth")
    synthesize_to_folder(root, sites=2, studies_per_site=3, seed=4, small=True)
    return root


@pytest.fixture(scope="session")
def planned_spec(synth_root: Path) -> Any:
    """The shipped prostate spec with the plan its training data give (the synthetic sites)."""
    from radfed.federation.learning.cohort import cohort_from_sources
    from radfed.inference.model.taskspec import load_task_spec

    return cohort_from_sources(load_task_spec(), [str(synth_root)]).spec


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    """A model artifact trained for a few steps (mechanics, not accuracy)."""
    from radfed.federation.learning.train_local import train_local_artifact

    out = tmp_path_factory.mktemp("artifact")
    train_local_artifact(task=None, sources=[str(synth_root)], out=out, steps=6, version="0.0.1")
    return out


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (Debian package) for the session; a failed start fails the test, never a skip."""
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A new, empty database on the session's server, named after the test."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:40]
    return postgres.create_database(f"{name}_{os.getpid()}_{next(_DATABASES)}")
