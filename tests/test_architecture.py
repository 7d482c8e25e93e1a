"""The shape of the code: packaging, import direction, and what importing costs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "radfed.plugin": "plugin",
    "radfed.federation": "federation",
    "radfed.inference": "inference",
    "radfed.dicom_sr": "dicom_sr",
    "radfed.deploy": "deploy",
}


def test_every_source_package_is_packaged() -> None:
    """A subpackage missing from pyproject's list would be absent from the wheel."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == PACKAGE_DIRS
    found = set()
    for package, folder in PACKAGE_DIRS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((package, *relative)))
    # folders of data only (task specs, deploy assets) are listed as packages with package data, no __init__.py
    data_only = {name for name in config["package-data"] if name != "*"} - found
    assert all((REPO / PACKAGE_DIRS[n.split(".")[0] + "." + n.split(".")[1]]).is_dir() for n in data_only)
    assert found | data_only == set(config["packages"])


def test_plugin_import_is_light() -> None:
    """``import radfed.plugin`` (and the CLI module) must not pull torch, opacus or flwr."""
    code = (
        "import sys, radfed.plugin, radfed.plugin.commands.cli; "
        "heavy = [m for m in ('torch', 'opacus', 'flwr', 'onnxruntime', 'highdicom') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_imports_go_downward() -> None:
    """import-linter's layers contract (configured in pyproject.toml)."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEPT" in result.stdout


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "radfed.plugin", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for command in ("synth", "volume"):
        assert command in result.stdout
