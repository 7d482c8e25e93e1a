"""The built wheel is the product: it carries the deployment files and task specs, and the code finds them
inside the installed package, not in a checkout.

The wheel is built from a copy of the sources in a temporary folder (the checkout's ``build/`` holds the
editable install and is left alone), without build isolation, so no index is needed. Installing it with its
dependencies in a fresh venv needs an index, so the lookups run against the wheel unpacked onto PYTHONPATH
under ``python -S``: neither the venv's site-packages (with the editable install) nor the checkout is visible.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 120
SHIPPED_DEPLOY_FILES = (
    "orthanc/radfed_orthanc_plugin.py",
    "orthanc/orthanc-radfed.json",
    "orthanc/orthanc-explorer-2-radfed.json",
    "node/radfed-node.toml",
    "flower/pyproject.toml",
    "flower/make-credentials.sh",
    "ohif/app-config.js",
    "ohif/fetch-ohif.sh",
    "systemd/radfed-node.service",
)


@dataclass(frozen=True)
class BuiltWheel:
    path: Path
    names: frozenset[str]
    log: str
    unpacked: Path


def _source_folders() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = set(config["package-dir"].values())
    folders.update(module.split(".")[0] for module in config.get("py-modules", []))
    return sorted(folders)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltWheel]:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in _source_folders():
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-v"]
        + ["-w", str(work / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = (work / "dist").glob("radfed-*.whl")
    unpacked = work / "site"
    with zipfile.ZipFile(path) as archive:
        names = frozenset(archive.namelist())
        archive.extractall(unpacked)
    yield BuiltWheel(path, names, built.stdout + built.stderr, unpacked)


def _run_isolated(wheel: BuiltWheel, code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``python -S -c code`` with only the unpacked wheel importable, from a folder outside the checkout."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(wheel.unpacked),
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def test_wheel_carries_the_deployment_files(wheel: BuiltWheel) -> None:
    missing = [name for name in SHIPPED_DEPLOY_FILES if f"radfed/deploy/{name}" not in wheel.names]
    assert missing == []


def test_wheel_carries_every_shipped_task_spec(wheel: BuiltWheel) -> None:
    specs = sorted(p.name for p in (REPO / "inference" / "model" / "tasks").glob("*.toml"))
    assert specs
    assert [name for name in specs if f"radfed/inference/model/tasks/{name}" not in wheel.names] == []


def test_wheel_carries_the_ledger_migrations(wheel: BuiltWheel) -> None:
    """The node migrates its ledger at start-up from the installed package: env.py and every revision."""
    folder = REPO / "plugin" / "node" / "ledger" / "migrations"
    shipped = [p.relative_to(folder).as_posix() for p in folder.rglob("*.py")]
    assert "env.py" in shipped and any(name.startswith("versions/v0001") for name in shipped)
    assert [name for name in shipped if f"radfed/plugin/node/ledger/migrations/{name}" not in wheel.names] == []


def test_wheel_keeps_radfed_a_namespace(wheel: BuiltWheel) -> None:
    assert not [name for name in wheel.names if name.count("/") == 1 and name.startswith("radfed/")]


def test_build_leaves_no_data_folder_out(wheel: BuiltWheel) -> None:
    """setuptools warns when a data folder is not a listed package (inference/model/tasks is one)."""
    assert "would be ignored" not in wheel.log
    assert "absent from the `packages` configuration" not in wheel.log


def test_unpacked_wheel_finds_its_assets_without_the_checkout(wheel: BuiltWheel, tmp_path: Path) -> None:
    code = """if True:
        import json, sys
        from radfed.deploy import ASSETS, asset
        from radfed.plugin.commands.federation import find_app_dir
        from radfed.plugin.tools.viewer import default_dist
        print(json.dumps({
            "assets": {name: str(asset(*parts)) for name, parts in ASSETS.items()},
            "flower": str(find_app_dir(None)),
            "ohif": str(default_dist()),
            "checkout_importable": any("/build/__editable__" in p for p in sys.path),
        }))
    """
    result = _run_isolated(wheel, code, tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["checkout_importable"] is False
    root = wheel.unpacked / "radfed" / "deploy"
    for name, path in found["assets"].items():
        assert Path(path).is_relative_to(root), name
        assert Path(path).exists(), name
    assert Path(found["flower"]) == root / "flower"
    # OHIF is not in the wheel: an installed node looks in (and fetches into) the user's cache
    assert Path(found["ohif"]).is_relative_to(tmp_path / "cache" / "radfed" / "ohif")


def test_unpacked_wheel_loads_a_shipped_task_spec(wheel: BuiltWheel, tmp_path: Path) -> None:
    code = """if True:
        from importlib import resources
        spec = resources.files("radfed.inference.model") / "tasks"
        import json; print(json.dumps(sorted(p.name for p in spec.iterdir() if p.name.endswith(".toml"))))
        print(spec)
    """
    result = _run_isolated(wheel, code, tmp_path)
    assert result.returncode == 0, result.stderr
    names, folder = result.stdout.strip().splitlines()
    assert Path(folder) == wheel.unpacked / "radfed" / "inference" / "model" / "tasks"
    assert json.loads(names) == sorted(p.name for p in (REPO / "inference" / "model" / "tasks").glob("*.toml"))


def test_python_dash_m_radfed_plugin_runs_the_command_from_the_wheel(wheel: BuiltWheel, tmp_path: Path) -> None:
    """``python -m radfed.plugin`` is the radfed command from the wheel (radfed stays a namespace package: the
    repository's top level is fixed, so there is no radfed/__main__.py)."""
    code = """if True:
        import importlib.util, runpy, sys
        print(importlib.util.find_spec("radfed.plugin.__main__").origin)
        sys.argv = ["radfed", "--help"]
        runpy.run_module("radfed.plugin", run_name="__main__", alter_sys=True)
    """
    result = _run_isolated(wheel, code, tmp_path)
    origin, *_ = result.stdout.splitlines()
    assert Path(origin) == wheel.unpacked / "radfed" / "plugin" / "__main__.py"
    assert "usage: radfed" in result.stdout, result.stderr
    assert result.returncode == 0, result.stderr
