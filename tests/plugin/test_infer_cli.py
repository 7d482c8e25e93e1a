"""``radfed infer``: a study folder in, SEG + SR files out (valid DICOM), with a JSON summary."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from radfed.dicom_sr.validation import check_dciodvfy
from radfed.plugin.commands.cli import EXIT_BAD_INPUT, EXIT_OK, main


@pytest.mark.validators
def test_infer_writes_valid_results(
    tmp_path: Path, synth_root: Path, tiny_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = synth_root / "site-1" / "study-0001"
    out = tmp_path / "out"
    assert main(["infer", str(study), "--model", str(tiny_artifact), "--out", str(out)]) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["provider"] == "CPUExecutionProvider"
    assert set(summary["timings_s"]) >= {"load", "preprocess", "model", "postprocess", "encode", "qa"}
    assert any("-> t2w" in line for line in summary["selection"])
    written = [Path(p) for p in summary["written"]]
    assert len(written) == (2 if summary["lesions"] else 1)
    modalities = set()
    for path in written:
        assert check_dciodvfy(path).passed
        ds = pydicom.dcmread(path)
        modalities.add(ds.Modality)
        truth = json.loads((study / "truth.json").read_text())
        assert ds.StudyInstanceUID == truth["study_instance_uid"]
    assert "SR" in modalities


def test_infer_on_an_incomplete_study_says_why(
    tmp_path: Path, synth_root: Path, tiny_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    study = tmp_path / "study"
    shutil.copytree(synth_root / "site-2" / "study-0001", study)
    shutil.rmtree(study / "ADC")
    assert main(["infer", str(study), "--model", str(tiny_artifact), "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "no series matched rule adc" in capsys.readouterr().err
