"""Secondary Capture key images: valid, marked, and the outline drawn around the lesion."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radfed.dicom_sr.key_images import orientation_letters, render_key_image
from radfed.dicom_sr.outputs import build_results
from radfed.dicom_sr.profile import OutputProfile
from radfed.dicom_sr.seg import lesion_colour
from radfed.dicom_sr.validation import check_dciodvfy
from tests.dicom_sr.conftest import ResultFactory


@pytest.mark.validators
def test_one_key_image_per_lesion_passes_dciodvfy(tmp_path: Path, make_result: ResultFactory) -> None:
    result, _ = make_result(5, True)
    objects = build_results(result, OutputProfile(key_images=True))
    assert len(objects.key_images) == 5
    for image in objects.key_images:
        assert image.BurnedInAnnotation == "YES"
        assert image.SeriesDescription.endswith("RESEARCH USE ONLY")
        assert image.StudyInstanceUID == result.study_instance_uid
        path = tmp_path / f"{image.InstanceNumber}.dcm"
        image.save_as(path, enforce_file_format=True)
        assert check_dciodvfy(path).passed, check_dciodvfy(path).detail
    assert len({image.SOPInstanceUID for image in objects.key_images}) == 5


def test_outline_surrounds_the_lesion(make_result: ResultFactory) -> None:
    result, _ = make_result(1, False)
    lesion = result.lesions[0]
    pixels, factor = render_key_image(result, lesion)
    colour = np.array(lesion_colour(lesion.number))
    drawn = np.all(pixels == colour, axis=-1)
    rows, cols = np.nonzero(drawn)
    assert len(rows) > 20
    mask_rows, mask_cols = np.nonzero(result.lesion_mask(lesion.number)[lesion.measurements.key_slice])
    # The drawn outline's centre matches the lesion's centre on the key slice (within 1.5 source pixels).
    assert abs(rows.mean() / factor - (mask_rows.mean() + 0.5)) < 1.5
    assert abs(cols.mean() / factor - (mask_cols.mean() + 0.5)) < 1.5
    # The banner is there: the top rows are mostly black with yellow text.
    banner = pixels[:16].astype(int)
    yellowish = (banner[..., 0] > 150) & (banner[..., 1] > 150) & (banner[..., 2] < 100)
    assert yellowish.sum() > 50


def test_orientation_letters() -> None:
    assert orientation_letters([1, 0, 0]) == "L"
    assert orientation_letters([0, -1, 0]) == "A"
    assert orientation_letters([0, 0.9, -0.43]) == "PF"


def test_a_patient_name_outside_ascii_survives_in_the_key_image(tmp_path: Path, make_result: ResultFactory) -> None:
    shared, _ = make_result(1, False)
    sources = [copy.deepcopy(ds) for ds in shared.source_datasets]  # the fixture's result is shared: copy
    for ds in sources:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "M\u00fcller^J\u00fcrgen"
    result = dataclasses.replace(shared, source_datasets=type(shared.source_datasets)(sources))
    image = build_results(result, OutputProfile(key_images=True)).key_images[0]
    path = tmp_path / "key.dcm"
    image.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == "M\u00fcller^J\u00fcrgen"
