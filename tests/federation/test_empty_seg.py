"""A reference SEG that marks nothing is rejected with its own reason, never counted as "no lesion"
(issue 18, item 13). The faint SEGs are FRACTIONAL, written with highdicom, storing 1/255 for "inside"."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from radfed.federation.learning.cohort import EMPTY_REFERENCE_SEG, SiteCohort, cohort_from_sources
from radfed.inference.dicom.seg_reader import read_segmentation
from radfed.inference.dicom.series import volume_from_datasets
from radfed.inference.model.taskspec import TaskSpec
from radfed.inference.testing.synthetic.sites import Sequence
from radfed.inference.testing.synthetic.study import SyntheticStudy
from radfed.inference.testing.synthetic.writer import REFERENCE_SEG_FOLDER, write_study

FAINT = 1 / 255
GLAND = 1  # segment numbers of the synthetic reference SEG: the gland, then one per lesion


def _fractional_seg(study: SyntheticStudy, fractions: Mapping[int, float]) -> Dataset:
    """The study's reference SEG rewritten as FRACTIONAL, each segment's voxels at ``fractions[number]``."""
    t2w = study.series[Sequence.T2W]
    binary = read_segmentation(study.reference_seg, volume_from_datasets(t2w))
    descriptions = [hd.seg.SegmentDescription.from_dataset(item) for item in study.reference_seg.SegmentSequence]
    numbers = [int(item.SegmentNumber) for item in study.reference_seg.SegmentSequence]
    pixel_array = np.stack([binary.masks[n].astype(np.float32) * fractions[n] for n in numbers], axis=-1)
    return hd.seg.Segmentation(
        source_images=t2w,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Faint Writer",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        max_fractional_value=255,
    )


def _segment_numbers(study: SyntheticStudy) -> list[int]:
    return [int(item.SegmentNumber) for item in study.reference_seg.SegmentSequence]


def _cohort(tmp_path: Path, study: SyntheticStudy, spec: TaskSpec, seg: Dataset | None) -> SiteCohort:
    folder = write_study(study, tmp_path / "site")
    if seg is not None:
        seg.save_as(folder / REFERENCE_SEG_FOLDER / "SEG-0001.dcm", enforce_file_format=True)
    return cohort_from_sources(spec, [str(folder)])


def test_the_faint_seg_stores_one_of_255(small_study: SyntheticStudy) -> None:
    seg = _fractional_seg(small_study, dict.fromkeys(_segment_numbers(small_study), FAINT))
    stored = seg.pixel_array
    assert seg.SegmentationType == "FRACTIONAL" and int(seg.MaximumFractionalValue) == 255
    assert set(np.unique(stored).tolist()) == {0, 1}


def test_reader_names_faint_segments(small_study: SyntheticStudy) -> None:
    numbers = _segment_numbers(small_study)
    seg = _fractional_seg(small_study, {n: (1.0 if n == GLAND else FAINT) for n in numbers})
    result = read_segmentation(seg, volume_from_datasets(small_study.series[Sequence.T2W]))
    lesions = [n for n in numbers if n != GLAND]
    assert sorted(result.faint_segments) == lesions
    assert all(peak == pytest.approx(FAINT) for peak in result.faint_segments.values())
    assert result.empty_segments == tuple(lesions)
    assert result.masks[GLAND].any()


def test_intact_study_is_usable(tmp_path: Path, small_study: SyntheticStudy, planned_spec: TaskSpec) -> None:
    report = _cohort(tmp_path, small_study, planned_spec, None).report
    assert (report.usable, report.rejected, report.empty_reference_segs) == (1, [], 0)


def test_all_faint_seg_is_rejected_as_empty(
    tmp_path: Path, small_study: SyntheticStudy, planned_spec: TaskSpec
) -> None:
    seg = _fractional_seg(small_study, dict.fromkeys(_segment_numbers(small_study), FAINT))
    cohort = _cohort(tmp_path, small_study, planned_spec, seg)
    report = cohort.report
    assert (report.found, report.usable, cohort.entries) == (1, 0, [])
    assert report.rejection_counts() == {EMPTY_REFERENCE_SEG: 1}
    assert report.empty_reference_segs == 1
    assert "below the 0.5 threshold" in report.rejected[0].reason
    assert report.as_metrics()["label_negative"] == 0  # not counted as a lesion-free study


def test_faint_lesions_beside_a_drawn_gland_are_rejected(
    tmp_path: Path, small_study: SyntheticStudy, planned_spec: TaskSpec
) -> None:
    seg = _fractional_seg(small_study, {n: (1.0 if n == GLAND else FAINT) for n in _segment_numbers(small_study)})
    report = _cohort(tmp_path, small_study, planned_spec, seg).report
    assert report.empty_reference_segs == 1 and report.usable == 0
    assert "lesion segment" in report.rejected[0].reason


def test_full_fractional_seg_is_usable(tmp_path: Path, small_study: SyntheticStudy, planned_spec: TaskSpec) -> None:
    """The check refuses faint SEGs, not FRACTIONAL ones: the same SEG at 1.0 trains with its lesions."""
    seg = _fractional_seg(small_study, dict.fromkeys(_segment_numbers(small_study), 1.0))
    cohort = _cohort(tmp_path, small_study, planned_spec, seg)
    assert cohort.report.usable == 1 and cohort.report.empty_reference_segs == 0
    assert cohort.entries[0].lesions.any()
