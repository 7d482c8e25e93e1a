"""The ``radfed`` command's contract: output formats and exit statuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from radfed.inference.testing.synthetic.study import SyntheticStudy
from radfed.inference.testing.synthetic.writer import write_study
from radfed.plugin.commands.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE, main, orthanc_endpoint_from_url


def test_volume_json(tmp_path: Path, small_study: SyntheticStudy, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_study(small_study, tmp_path)
    assert main(["volume", str(folder / "T2W"), "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["shape"] == list(small_study.t2w_grid.shape)
    np.testing.assert_allclose(np.array(report["affine"]), small_study.t2w_grid.affine, atol=1e-4)


def test_volume_on_a_seg_folder_is_bad_input(
    tmp_path: Path, small_study: SyntheticStudy, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_study(small_study, tmp_path)
    assert main(["volume", str(folder / "SEG"), "--json"]) == EXIT_BAD_INPUT
    assert "not-an-image" in capsys.readouterr().err


def test_volume_on_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["volume", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "no DICOM files" in capsys.readouterr().err


def test_synth_needs_a_destination(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--sites", "1"]) == EXIT_USAGE
    assert main(["synth", "--sites", "2", "--orthanc", "http://127.0.0.1:1"]) == EXIT_USAGE


def test_credentials_leave_the_url() -> None:
    endpoint = orthanc_endpoint_from_url("http://alice:s%40cret@127.0.0.1:8042")
    assert endpoint.url == "http://127.0.0.1:8042"
    assert (endpoint.username, endpoint.password) == ("alice", "s@cret")
    assert "s@cret" not in repr(endpoint)
