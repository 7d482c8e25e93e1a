"""A result with 50 lesions: the SR says of each lesion what the lesion says, and the SEG check is exact."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes as dcm_codes

from bench.encode_results import CODES, ct_series, result_of
from radfed.dicom_sr import codes
from radfed.dicom_sr.outputs import build_results
from radfed.dicom_sr.profile import OutputProfile
from radfed.dicom_sr.qa import encoded, verify_seg_geometry, verify_sr
from radfed.dicom_sr.seg import build_seg, result_key
from radfed.dicom_sr.seg_exact import exact_mismatch
from radfed.inference.dicom.seg_reader import read_segmentation_labels
from radfed.inference.errors import ResultQualityError
from radfed.inference.pipeline.findings import InferenceResult

LESIONS = 50


@pytest.fixture(scope="module")
def many() -> InferenceResult:
    """50 ellipsoids of 2 to 4.5 voxels radius on a 24 x 96 x 96 CT grid, 25 per layer, none touching."""
    labels = np.zeros((24, 96, 96), dtype=np.uint8)
    s, r, c = np.ogrid[:24, :96, :96]
    for number in range(1, LESIONS + 1):
        layer, cell = divmod(number - 1, 25)
        radius = 2.0 + (number % 6) * 0.5
        row, column = 10 + 18 * (cell // 5), 10 + 18 * (cell % 5)
        inside = ((s - (6 + 11 * layer)) / 2.5) ** 2 + ((r - row) ** 2 + (c - column) ** 2) / radius**2 <= 1
        labels[inside] = number
    return result_of(ct_series(24, 96), labels)


def _concept(item: pydicom.Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return (str(name.CodingSchemeDesignator), str(name.CodeValue))


def _key(code: object) -> tuple[str, str]:
    return (code.scheme_designator, code.value)  # type: ignore[attr-defined]


def _groups(sr: pydicom.Dataset) -> list[dict[tuple[str, str], list[pydicom.Dataset]]]:
    """Each measurement group's items by concept, read with pydicom from the written bytes."""
    (measurements,) = [i for i in sr.ContentSequence if _concept(i) == _key(dcm_codes.DCM.ImagingMeasurements)]
    groups = []
    for group in measurements.ContentSequence:
        by_concept: dict[tuple[str, str], list[pydicom.Dataset]] = {}
        for item in group.ContentSequence:
            by_concept.setdefault(_concept(item), []).append(item)
        groups.append(by_concept)
    return groups


def _number(items: list[pydicom.Dataset]) -> float:
    (item,) = items
    return float(item.MeasuredValueSequence[0].NumericValue)


def test_every_lesion_has_its_two_groups_with_its_own_values(many: InferenceResult) -> None:
    sr = encoded(build_results(many).sr)
    key = result_key(many)
    groups = _groups(sr)
    assert len(groups) == 2 * LESIONS
    by_tracking: dict[str, list[dict[tuple[str, str], list[pydicom.Dataset]]]] = {}
    for group in groups:
        (tracking,) = group[_key(dcm_codes.DCM.TrackingUniqueIdentifier)]
        by_tracking.setdefault(str(tracking.UID), []).append(group)
    assert len(by_tracking) == LESIONS
    for lesion in many.lesions:
        m = lesion.measurements
        pair = by_tracking[key.tracking_uid(lesion.number)]
        (volumetric,) = [g for g in pair if _key(dcm_codes.DCM.ReferencedSegment) in g]
        (planar,) = [g for g in pair if _key(dcm_codes.DCM.ImageRegion) in g]
        for group in pair:
            (label,) = group[_key(dcm_codes.DCM.TrackingIdentifier)]
            assert label.TextValue == f"Lesion {lesion.number}"
        (segment,) = volumetric[_key(dcm_codes.DCM.ReferencedSegment)]
        assert int(segment.ReferencedSOPSequence[0].ReferencedSegmentNumber) == lesion.number
        assert _number(volumetric[_key(codes.VOLUME)]) == pytest.approx(round(m.volume_mm3, 2), abs=1e-9)
        probability = (CODES.probability_concept.scheme_designator, CODES.probability_concept.value)
        assert _number(volumetric[probability]) == pytest.approx(round(100 * lesion.probability, 2), abs=1e-9)
        assert _number(planar[_key(codes.LONG_AXIS)]) == pytest.approx(round(m.long_axis_mm, 2), abs=1e-9)
        assert _number(planar[_key(codes.SHORT_AXIS)]) == pytest.approx(round(m.short_axis_mm, 2), abs=1e-9)
        (region,) = planar[_key(dcm_codes.DCM.ImageRegion)]
        outline = np.asarray(region.GraphicData, dtype=np.float32).reshape(-1, 2)
        expected = np.array([(c + 0.5, r + 0.5) for r, c in m.outline_rc], dtype=np.float32)
        np.testing.assert_array_equal(outline, expected)
        (image,) = region.ContentSequence
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == many.grid.slice_sources[m.key_slice][0]


@pytest.mark.parametrize("encoding", ["BINARY", "LABELMAP"])
def test_the_exact_seg_check_agrees_with_the_general_reader(many: InferenceResult, encoding: str) -> None:
    seg = encoded(build_seg(many, OutputProfile(seg_encoding=encoding)))  # type: ignore[arg-type]
    assert exact_mismatch(seg, many.lesion_labels, many.grid) is None
    decoded, _ = read_segmentation_labels(seg, many.grid)
    np.testing.assert_array_equal(decoded, many.lesion_labels)
    # One voxel more of lesion 7 than the SEG holds: both checks refuse it.
    grown = many.lesion_labels.copy()
    s, r, c = np.argwhere(grown == 7)[0]
    assert grown[s, r, c - 1] == 0
    grown[s, r, c - 1] = 7
    assert exact_mismatch(seg, grown, many.grid) is not None
    with pytest.raises(ResultQualityError, match="segment 7"):
        verify_seg_geometry(seg, grown, many.grid)


def test_a_bit_flipped_in_the_stored_seg_is_found(many: InferenceResult) -> None:
    seg = encoded(build_seg(many))  # type: ignore[arg-type]
    pixels = bytearray(seg.PixelData)
    pixels[len(pixels) // 2] ^= 0x10
    seg.PixelData = bytes(pixels)
    damaged = encoded(seg)
    assert exact_mismatch(damaged, many.lesion_labels, many.grid) is not None
    with pytest.raises(ResultQualityError):
        verify_seg_geometry(damaged, many.lesion_labels, many.grid)


def test_a_frame_moved_to_another_slice_is_found(many: InferenceResult) -> None:
    seg = encoded(build_seg(many))  # type: ignore[arg-type]
    position = seg.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence[0]
    position.ImagePositionPatient = [*position.ImagePositionPatient[:2], float(position.ImagePositionPatient[2]) + 1]
    assert "references the source image of another slice" in str(
        exact_mismatch(encoded(seg), many.lesion_labels, many.grid)
    )


def test_sr_qa_finds_a_reference_outside_the_evidence_anywhere_in_the_tree(many: InferenceResult) -> None:
    """highdicom's own evidence check is not run on the full tree (sr._trunk); the QA does it on the bytes."""
    objects = build_results(many)
    sr = encoded(objects.sr)
    item = pydicom.Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
    item.ConceptNameCodeSequence = [pydicom.Dataset()]
    name = item.ConceptNameCodeSequence[0]
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121112", "DCM", "Source of Measurement"
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    item.ReferencedSOPSequence = [reference]
    sr.ContentSequence[-1].ContentSequence.append(item)
    with pytest.raises(ResultQualityError, match="evidence does not list"):
        verify_sr(encoded(sr), many, OutputProfile().sr_variant, objects.seg)
