"""The ONNX runtime comes from exactly one extra: ``gpu`` brings onnxruntime-gpu, ``cpu`` (and ``dev``, what CI
installs) onnxruntime, never both (they install the same module; with both, the node silently runs on the CPU).

The extras are read from pyproject.toml offline; pip's resolver checks them against PyPI in dry runs (metadata only,
nothing is installed). Inside the tests' network namespace PyPI cannot be reached and those say so and skip;
``make extras`` (part of ``make test``) runs them outside it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


def _closure(extras: set[str], table: dict[str, list[str]]) -> set[str]:
    """The distribution names an install of ``radfed[extras]`` asks for, self-references followed."""
    names: set[str] = set()
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in table[extra]:
            requirement = Requirement(line)
            if requirement.name == "radfed":
                todo.extend(requirement.extras)
            else:
                names.add(requirement.name)
    return names


@cache
def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


@pytest.mark.parametrize(
    ("extras", "runtime"),
    [({"gpu"}, "onnxruntime-gpu"), ({"cpu"}, "onnxruntime"), ({"serve"}, "onnxruntime"), ({"dev"}, "onnxruntime")]
    + [({"train", "gpu"}, "onnxruntime-gpu"), ({"dev-gpu"}, "onnxruntime-gpu")],
)
def test_an_extra_asks_for_one_runtime(extras: set[str], runtime: str) -> None:
    assert _closure(extras, _extras()) & RUNTIMES == {runtime}


def test_no_extra_but_cpu_and_gpu_brings_a_runtime_of_its_own() -> None:
    carrying = {name for name in _extras() if _closure({name}, _extras()) & RUNTIMES}
    assert carrying == {"cpu", "gpu", "serve", "dev", "dev-gpu"}
    assert not _closure({"train"}, _extras()) & RUNTIMES  # a training site picks its runtime: [train,cpu|gpu]


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


def _resolved(extras: str, tmp: Path) -> set[str]:
    """What pip would install into an empty venv for ``radfed[extras]`` (a dry run: metadata only)."""
    report = tmp / f"report-{extras.replace(',', '-')}.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        + ["--report", str(report), f"{ROOT}[{extras}]"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize(
    ("extras", "present", "absent"),
    [
        ("gpu", "onnxruntime-gpu", "onnxruntime"),
        ("cpu", "onnxruntime", "onnxruntime-gpu"),
        ("train,gpu", "onnxruntime-gpu", "onnxruntime"),
    ],
)
def test_pip_resolves_the_runtime_of_an_extra(extras: str, present: str, absent: str, tmp_path: Path) -> None:
    if not _pypi_reachable():
        pytest.skip("PyPI (pypi.org:443) is unreachable here (the tests' network namespace): run `make extras`")
    names = _resolved(extras, tmp_path)
    assert present in names
    assert absent not in names
