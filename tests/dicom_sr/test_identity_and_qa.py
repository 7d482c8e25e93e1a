"""Deterministic UIDs, superseding versions, settings, task independence, and the geometry QA gate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from radfed.dicom_sr.outputs import build_results
from radfed.dicom_sr.profile import OutputProfile, SegEncoding, SrVariant, StudyFindingPlacement
from radfed.dicom_sr.qa import encoded, verify_seg_geometry, verify_sr
from radfed.dicom_sr.seg import build_seg
from radfed.dicom_sr.validation import ObjectKind, check_dciodvfy, check_strict_read, validate_file
from radfed.inference.dicom.seg_reader import read_segmentation
from radfed.inference.errors import ResultQualityError
from radfed.inference.pipeline.findings import InferenceResult, LesionFinding, ModelIdentity
from radfed.plugin.commands.cli import main
from tests.dicom_sr.conftest import BRAIN_CODES, ResultFactory


def _uids(objects: object) -> tuple[str, ...]:
    seg, sr = objects.seg, objects.sr  # type: ignore[attr-defined]
    return (seg.SeriesInstanceUID, seg.SOPInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)


def test_rerun_gives_identical_uids(make_result: ResultFactory) -> None:
    result, _ = make_result(1, False)
    first, second = build_results(result), build_results(result)
    assert _uids(first) == _uids(second)
    tracking = [s.TrackingUID for s in first.seg.SegmentSequence]  # type: ignore[union-attr]
    assert tracking == [s.TrackingUID for s in second.seg.SegmentSequence]  # type: ignore[union-attr]
    assert all(uid.startswith("2.25.") and len(uid) <= 64 for uid in _uids(first))


def test_new_model_version_supersedes(make_result: ResultFactory) -> None:
    old_result, _ = make_result(1, False)
    old = build_results(old_result)
    new_result = dataclasses.replace(old_result, model=ModelIdentity("prostate-lesions", "1.1.0"))
    new = build_results(new_result, predecessor=old.sr)
    assert set(_uids(old)).isdisjoint(_uids(new))
    predecessor = new.sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == old.sr.SOPInstanceUID
    assert "v1.1.0" in new.seg.SeriesDescription  # type: ignore[union-attr]


def test_new_input_instances_give_a_new_result(make_result: ResultFactory) -> None:
    result, _ = make_result(1, False)
    later = dataclasses.replace(result, input_fingerprint="0" * 32)
    assert set(_uids(build_results(result))).isdisjoint(_uids(build_results(later)))


def test_research_marking(make_result: ResultFactory) -> None:
    result, _ = make_result(1, True)
    objects = build_results(result)
    seg, sr = objects.seg, objects.sr
    assert seg is not None
    for ds in (seg, sr):
        assert ds.SeriesDescription.endswith("RESEARCH USE ONLY")
        assert ds.ContentQualification == "RESEARCH"
        assert ds.Manufacturer == "radfed"
        assert "radfed" in {item.Manufacturer for item in ds.ContributingEquipmentSequence}
        assert ds.SeriesNumber >= 9500
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    segment = seg.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert len(segment.RecommendedDisplayCIELabValue) == 3
    assert seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert len(seg.ReferencedSeriesSequence) == 1
    # small case: interior empty frames are kept (one frame per slice)
    assert int(seg.NumberOfFrames) == result.grid.shape[0]


def test_no_lesion_gives_only_an_sr_that_says_so(make_result: ResultFactory) -> None:
    result, _ = make_result(0, False)
    objects = build_results(result)
    assert objects.seg is None
    top = list(objects.sr.ContentSequence)
    assert not any(
        item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "126010" for item in top
    )
    evaluations = [item for item in top if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    assert len(evaluations) == 1
    items = list(evaluations[0].ContentSequence)
    codes = {
        (i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
        for i in items
        if i.ValueType == "CODE"
    }
    assert ("121071", "111286") in codes  # Finding = No abnormality
    texts = [i.TextValue for i in items if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111047"]
    assert texts == [f"{result.study_finding.probability * 100:.0f} % (model prostate-lesions 1.0.0)"]
    assert not any(item.ValueType == "SCOORD" for item in _content_items(objects.sr))


def test_study_finding_as_a_measurement_group_keeps_the_number(make_result: ResultFactory) -> None:
    """The machine-readable placement (not the default: OHIF 3.13.2 cannot draw an SR holding it)."""
    result, _ = make_result(0, False)
    sr = build_results(result, OutputProfile(study_finding=StudyFindingPlacement.MEASUREMENT_GROUP)).sr
    items = list(_content_items(sr))
    assert ("121071", "111286") in {
        (i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
        for i in items
        if i.ValueType == "CODE"
    }
    probabilities = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "111047"]
    assert len(probabilities) == 1
    assert float(probabilities[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        round(100 * result.study_finding.probability, 2), abs=1e-2
    )


def _content_items(ds: pydicom.Dataset):  # type: ignore[no-untyped-def]
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_other_task_codes_flow_through(make_result: ResultFactory) -> None:
    result, _ = make_result(1, False, codes=BRAIN_CODES)
    objects = build_results(result)
    seg = objects.seg
    assert seg is not None
    assert seg.SegmentSequence[0].SegmentLabel == "Tumour 1"
    assert seg.SegmentSequence[0].AnatomicRegionSequence[0].CodeMeaning == "Brain"
    text = str(objects.sr)
    assert "Probability of high-grade glioma" in text and "Prostate" not in text


@pytest.mark.validators
def test_labelmap_setting(tmp_path: Path, make_result: ResultFactory) -> None:
    result, _ = make_result(5, False)
    objects = build_results(result, OutputProfile(seg_encoding="LABELMAP"))
    seg = objects.seg
    assert seg is not None
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    path = tmp_path / "labelmap.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert check_dciodvfy(path).passed, check_dciodvfy(path).detail
    assert check_strict_read(path, ObjectKind.SEG).passed
    masks = read_segmentation(seg, result.grid).masks
    for lesion in result.lesions:
        np.testing.assert_array_equal(masks[lesion.number], result.lesion_mask(lesion.number))


def test_volumetric_only_variant(make_result: ResultFactory) -> None:
    result, _ = make_result(1, False)
    objects = build_results(result, OutputProfile(sr_variant=SrVariant.VOLUMETRIC_ONLY))
    sr = hd.sr.Comprehensive3DSR.from_dataset(objects.sr)
    assert sr.content.get_planar_roi_measurement_groups() == []
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == 1


def test_profile_names_bad_choices() -> None:
    with pytest.raises(ValueError, match="BINARY, LABELMAP"):
        OutputProfile(seg_encoding="FRACTIONAL")
    assert OutputProfile(seg_encoding="LABELMAP").seg_encoding is SegEncoding.LABELMAP


def _with_labels(result: InferenceResult, transform: object) -> InferenceResult:
    return dataclasses.replace(result, lesion_labels=np.ascontiguousarray(transform(result.lesion_labels)))  # type: ignore[operator]


@pytest.mark.parametrize(
    "corruption",
    [
        lambda m: m[:, ::-1, :],
        lambda m: m[:, :, ::-1],
        lambda m: m[::-1],
        lambda m: np.roll(m, 3, axis=2),
        lambda m: np.roll(m, 1, axis=0),
    ],
    ids=["flip-rows", "flip-columns", "flip-slices", "shift-3-columns", "shift-1-slice"],
)
def test_qa_refuses_a_flipped_or_shifted_seg(make_result: ResultFactory, corruption: object) -> None:
    result, _ = make_result(1, True)
    wrong = build_seg(_with_labels(result, corruption))
    assert wrong is not None
    with pytest.raises(ResultQualityError, match="segment 1"):
        verify_seg_geometry(encoded(wrong), result.lesion_labels, result.grid)


def test_qa_accepts_the_true_seg(make_result: ResultFactory) -> None:
    result, _ = make_result(5, True)
    seg = build_seg(result)
    assert seg is not None
    verify_seg_geometry(encoded(seg), result.lesion_labels, result.grid)


def test_labels_must_match_the_lesions(make_result: ResultFactory) -> None:
    result, _ = make_result(1, False)
    lesion = result.lesions[0]
    twin = LesionFinding(2, lesion.probability, lesion.measurements)
    with pytest.raises(ValueError, match="exactly the lesions"):
        dataclasses.replace(result, lesions=(lesion, twin))  # lesion 2 has no voxels


@pytest.mark.validators
def test_validate_command(tmp_path: Path, make_result: ResultFactory, capsys: pytest.CaptureFixture[str]) -> None:
    result, _ = make_result(1, False)
    objects = build_results(result)
    assert objects.seg is not None
    good_seg, good_sr, broken = tmp_path / "seg.dcm", tmp_path / "sr.dcm", tmp_path / "broken.dcm"
    objects.seg.save_as(good_seg, enforce_file_format=True)
    objects.sr.save_as(good_sr, enforce_file_format=True)
    damaged = pydicom.dcmread(good_seg)
    del damaged.SegmentSequence[0].SegmentedPropertyTypeCodeSequence
    damaged.save_as(broken)
    assert main(["validate", str(good_seg), str(good_sr)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("OK") for line in lines)
    assert main(["validate", str(good_seg), str(broken)]) == 3
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("OK") and lines[1].startswith("FAIL")
    report = validate_file(broken)
    assert not report.passed and report.kind is ObjectKind.SEG


def _groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(measurements.ContentSequence)


def _planar_outline(group: pydicom.Dataset) -> pydicom.Dataset | None:
    return next((item for item in group.ContentSequence if item.ValueType == "SCOORD"), None)


def _drop_planar_group(sr: pydicom.Dataset) -> None:
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    measurements.ContentSequence = [g for g in measurements.ContentSequence if _planar_outline(g) is None]


def _outline_off_the_image(sr: pydicom.Dataset) -> None:
    outline = next(o for g in _groups(sr) if (o := _planar_outline(g)) is not None)
    outline.GraphicData = [-5.0 if i % 2 else v for i, v in enumerate(outline.GraphicData)]


def _reference_outside_the_evidence(sr: pydicom.Dataset) -> None:
    del sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[-1]


def _not_tid_1500(sr: pydicom.Dataset) -> None:
    sr.ContentTemplateSequence[0].TemplateIdentifier = "2000"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_planar_group, "no planar outline"),
        (_outline_off_the_image, "outline leaves the image"),
        (_reference_outside_the_evidence, "evidence does not list"),
        (_not_tid_1500, "TID 1500"),
    ],
    ids=["no-planar-twin", "outline-off-image", "unlisted-reference", "not-tid-1500"],
)
def test_sr_qa_refuses_a_damaged_report(make_result: ResultFactory, damage: object, message: str) -> None:
    result, _ = make_result(1, False)
    objects = build_results(result)
    verify_sr(encoded(objects.sr), result, SrVariant.VIEWER, objects.seg)
    broken = encoded(objects.sr)
    damage(broken)  # type: ignore[operator]
    with pytest.raises(ResultQualityError, match=message):
        verify_sr(encoded(broken), result, SrVariant.VIEWER, objects.seg)
