"""Robustness: every file shipped in the pydicom and pydicom-data wheels (~260, many vendors, every
transfer syntax, broken files on purpose) either loads as a volume or raises the documented
DicomInputError; nothing else escapes."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest
from pydicom.data import get_testdata_files

from radfed.inference.dicom.series import read_series_files, volume_from_datasets
from radfed.inference.errors import DicomInputError, NotAVolumeError


def test_every_corpus_file_loads_or_raises_the_documented_error() -> None:
    files = [Path(f) for f in get_testdata_files("**/*") if Path(f).is_file()]
    assert len(files) > 200, "pydicom-data is not installed (make install adds it)"
    outcomes: Counter[str] = Counter()
    loaded_syntaxes: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            try:
                datasets = read_series_files([path])
                volume = volume_from_datasets(datasets, allow_single_slice=True)
            except NotAVolumeError as exc:
                outcomes[exc.cause.value] += 1
            except DicomInputError:
                outcomes["unreadable"] += 1
            else:
                outcomes["loaded"] += 1
                assert volume.array.ndim == 3
                loaded_syntaxes.add(str(datasets[0].file_meta.get("TransferSyntaxUID", "")))
    # Enough real images load, across several encodings (JPEG, JPEG-LS, JPEG 2000, RLE, ...).
    assert outcomes["loaded"] >= 40, outcomes
    assert len(loaded_syntaxes) >= 6, loaded_syntaxes
    assert sum(outcomes.values()) == len(files)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR2_J2KI.dcm",
        "MR_small_bigendian.dcm",
        "eCT_Supplemental.dcm",
    ],
)
def test_known_images_load(name: str) -> None:
    path = Path(get_testdata_files(name)[0])
    volume = volume_from_datasets(read_series_files([path]), allow_single_slice=True)
    assert volume.array.size > 0
