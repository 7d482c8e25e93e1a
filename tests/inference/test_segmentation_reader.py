"""Reference SEGs from several writers and with their habits land on the right voxels; what cannot be
placed is refused with a reason."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from radfed.inference.dicom.seg_reader import read_segmentation
from radfed.inference.dicom.series import volume_from_datasets
from radfed.inference.dicom.volume import Volume
from radfed.inference.errors import SegmentationReadError
from radfed.inference.testing.synthetic.sites import Sequence
from radfed.inference.testing.synthetic.study import SyntheticStudy
from radfed.inference.testing.synthetic.writer import write_study


@pytest.fixture(scope="module")
def t2w(small_study: SyntheticStudy) -> Volume:
    return volume_from_datasets(small_study.series[Sequence.T2W])


def _assert_lesions(result_masks: dict[int, np.ndarray], study: SyntheticStudy, first_lesion_segment: int) -> None:
    for number in range(1, len(study.phantom.lesions) + 1):
        expected = study.lesion_masks == number
        assert expected.any()
        np.testing.assert_array_equal(result_masks[first_lesion_segment + number - 1], expected)


def test_highdicom_reference_seg(small_study: SyntheticStudy, t2w: Volume) -> None:
    result = read_segmentation(small_study.reference_seg, t2w)
    _assert_lesions(result.masks, small_study, first_lesion_segment=2)
    assert result.segment(1).property_type is not None
    assert result.segment(1).property_type.value == "41216001"  # prostate
    assert result.segment(2).tracking_uid is not None


def _reordered(ds: pydicom.Dataset, order: list[int]) -> pydicom.Dataset:
    """The same SEG with its frames in another order (pixels and per-frame groups together)."""
    out = copy.deepcopy(ds)
    frames = out.pixel_array if out.pixel_array.ndim == 3 else out.pixel_array[np.newaxis]
    groups = list(out.PerFrameFunctionalGroupsSequence)
    out.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]
    packed = np.packbits(frames[order].reshape(-1), bitorder="little")
    out.PixelData = packed.tobytes() + (b"\0" if len(packed) % 2 else b"")
    out.NumberOfFrames = len(order)
    return out


def test_frames_in_descending_order(small_study: SyntheticStudy, t2w: Volume) -> None:
    seg = small_study.reference_seg
    reversed_seg = _reordered(seg, list(range(int(seg.NumberOfFrames)))[::-1])
    _assert_lesions(read_segmentation(reversed_seg, t2w).masks, small_study, 2)


def test_without_source_references(small_study: SyntheticStudy, t2w: Volume) -> None:
    seg = copy.deepcopy(small_study.reference_seg)
    for item in seg.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    _assert_lesions(read_segmentation(seg, t2w).masks, small_study, 2)


def test_without_positions_uses_source_references(small_study: SyntheticStudy, t2w: Volume) -> None:
    seg = copy.deepcopy(small_study.reference_seg)
    for item in seg.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence
    _assert_lesions(read_segmentation(seg, t2w).masks, small_study, 2)


def test_without_positions_or_references_is_refused(small_study: SyntheticStudy, t2w: Volume) -> None:
    seg = copy.deepcopy(small_study.reference_seg)
    for item in seg.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence
        del item.DerivationImageSequence
    with pytest.raises(SegmentationReadError, match="cannot be placed"):
        read_segmentation(seg, t2w)


def test_position_contradicting_source_reference_is_refused(small_study: SyntheticStudy, t2w: Volume) -> None:
    seg = copy.deepcopy(small_study.reference_seg)
    item = seg.PerFrameFunctionalGroupsSequence[0]
    position = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
    step = t2w.affine[:3, 0]
    item.PlanePositionSequence[0].ImagePositionPatient = [f"{v:.6f}" for v in position + step]
    with pytest.raises(SegmentationReadError, match="references the source image"):
        read_segmentation(seg, t2w)


def test_other_frame_of_reference_is_refused(small_study: SyntheticStudy, t2w: Volume) -> None:
    seg = copy.deepcopy(small_study.reference_seg)
    seg.FrameOfReferenceUID = hd.UID()
    with pytest.raises(SegmentationReadError, match="Frame of Reference"):
        read_segmentation(seg, t2w)


@pytest.mark.parametrize("kind", ["LABELMAP", "FRACTIONAL"])
def test_labelmap_and_fractional(small_study: SyntheticStudy, t2w: Volume, kind: str) -> None:
    n = len(small_study.phantom.lesions)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=f"Lesion {i}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i in range(1, n + 1)
    ]
    if kind == "LABELMAP":
        pixels = small_study.lesion_masks.astype(np.uint8)
    else:
        pixels = np.stack([(small_study.lesion_masks == i).astype(np.float32) for i in range(1, n + 1)], axis=-1)
        pixels *= 0.8  # stored fractions below 1 still mean "inside"
    seg = hd.seg.Segmentation(
        source_images=small_study.series[Sequence.T2W],
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=200,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        max_fractional_value=255,
    )
    _assert_lesions(read_segmentation(seg, t2w).masks, small_study, first_lesion_segment=1)


def _write_nifti(mask: np.ndarray, volume: Volume, path: Path) -> None:
    """radfed's (slice, row, column)/LPS mask as NIfTI (column, row, slice)/RAS for ITK-based tools."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine[:, [2, 1, 0, 3]]
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0).astype(np.uint8), affine), path)


@pytest.mark.validators
def test_dcmqi_written_seg(tmp_path: Path, small_study: SyntheticStudy, t2w: Volume) -> None:
    """A SEG written by dcmqi's itkimage2segimage (what 3D Slicer uses) reads back voxel for voxel."""
    folder = write_study(small_study, tmp_path)
    nifti = tmp_path / "lesion.nii.gz"
    lesion = small_study.lesion_masks == 1
    _write_nifti(lesion, t2w, nifti)
    meta = {
        "ContentCreatorName": "Reader^Slicer",
        "SeriesDescription": "Slicer segmentation",
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "BodyPartExamined": "PROSTATE",
        "segmentAttributes": [
            [
                {
                    "labelID": 1,
                    "SegmentDescription": "Lesion",
                    "SegmentAlgorithmType": "MANUAL",
                    "SegmentedPropertyCategoryCodeSequence": {
                        "CodeValue": "49755003",
                        "CodingSchemeDesignator": "SCT",
                        "CodeMeaning": "Morphologically Abnormal Structure",
                    },
                    "SegmentedPropertyTypeCodeSequence": {
                        "CodeValue": "108369006",
                        "CodingSchemeDesignator": "SCT",
                        "CodeMeaning": "Neoplasm",
                    },
                    "recommendedDisplayRGBValue": [255, 0, 0],
                }
            ]
        ],
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": "Image segmentation",
        "ClinicalTrialCoordinatingCenterName": "radfed tests",
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "dcmqi-seg.dcm"
    tool = Path(sys.executable).parent / "itkimage2segimage"
    result = subprocess.run(
        [str(tool), "--inputImageList", str(nifti), "--inputDICOMDirectory", str(folder / "T2W"),
         "--inputMetadata", str(tmp_path / "meta.json"), "--outputDICOM", str(out)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    seg = pydicom.dcmread(out)
    masks = read_segmentation(seg, t2w).masks
    np.testing.assert_array_equal(masks[1], lesion)
