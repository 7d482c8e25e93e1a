"""Broken series get the failure kind that names what is wrong with them, not an internal error
(issue 18, item 9). Series are built with pydicom here so that each breaks in exactly one way."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from radfed.inference.dicom.series import volume_from_datasets
from radfed.inference.errors import DicomInputError, NotAVolumeError, VolumeErrorCause
from radfed.plugin.node.failures import failure_label

_SIZE = 8


def _series(n_slices: int = 6, *, same_position: bool = False) -> list[Dataset]:
    """An axial MR series of ``n_slices`` 8 x 8 images, 2 mm apart (or all at z = 0)."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for index in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "MR"
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [-4.0, -4.0, 0.0 if same_position else 2.0 * index]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.0
        ds.Rows = ds.Columns = _SIZE
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.full((_SIZE, _SIZE), index, dtype=np.uint16).tobytes()
        datasets.append(ds)
    return datasets


def _round_trip(datasets: list[Dataset]) -> list[Dataset]:
    """Write and read back, as the node gets instances from Orthanc."""
    read: list[Dataset] = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        read.append(pydicom.dcmread(buffer))
    return read


def _refused(datasets: list[Dataset], cause: VolumeErrorCause) -> NotAVolumeError:
    with pytest.raises(NotAVolumeError) as info:
        volume_from_datasets(datasets)
    assert info.value.cause is cause, str(info.value)
    assert isinstance(info.value, DicomInputError)
    assert failure_label(info.value) == f"bad-input:{cause.value}"
    return info.value


def test_the_built_series_loads() -> None:
    """The builder itself makes a good series: every refusal below comes from the one defect."""
    volume = volume_from_datasets(_round_trip(_series()))
    assert volume.shape == (6, _SIZE, _SIZE)
    assert volume.spacing == pytest.approx((2.0, 1.0, 1.0))


@pytest.mark.parametrize("spacing", [[0.0, 0.0], [0.0, 1.0], [1.0, -1.0]], ids=["zero", "zero-row", "negative"])
def test_non_positive_pixel_spacing_is_missing_geometry(spacing: list[float]) -> None:
    datasets = _series()
    for ds in datasets:
        ds.PixelSpacing = spacing
    error = _refused(_round_trip(datasets), VolumeErrorCause.MISSING_GEOMETRY)
    assert "PixelSpacing" in str(error)


def test_zero_pixel_spacing_in_an_enhanced_series_is_missing_geometry() -> None:
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=_series(),
        series_instance_uid=hd.UID(),
        series_number=9,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    for item in enhanced.SharedFunctionalGroupsSequence:
        if "PixelMeasuresSequence" in item:
            item.PixelMeasuresSequence[0].PixelSpacing = [0.0, 0.0]
    for item in enhanced.PerFrameFunctionalGroupsSequence:
        if "PixelMeasuresSequence" in item:
            item.PixelMeasuresSequence[0].PixelSpacing = [0.0, 0.0]
    _refused([enhanced], VolumeErrorCause.MISSING_GEOMETRY)


def test_many_images_at_one_position_are_duplicate_positions() -> None:
    error = _refused(_round_trip(_series(24, same_position=True)), VolumeErrorCause.DUPLICATE_POSITIONS)
    assert "24" in str(error)


def test_one_position_repeated_is_allowed_where_one_slice_is() -> None:
    """Where a single plane is acceptable, a plane repeated over time gives its first time point."""
    volume = volume_from_datasets(_series(3, same_position=True), allow_single_slice=True)
    assert volume.shape == (1, _SIZE, _SIZE)
    assert float(volume.array.max()) == 0.0


def test_one_image_is_still_single_slice() -> None:
    _refused(_series(1), VolumeErrorCause.SINGLE_SLICE)


def test_zero_byte_pixel_data_is_no_pixel_data() -> None:
    datasets = _series()
    datasets[2].PixelData = b""
    read = _round_trip(datasets)
    assert read[2].PixelData in (None, b"")  # what pydicom hands back for a 0-byte element
    error = _refused(read, VolumeErrorCause.NO_PIXEL_DATA)
    assert "NoneType" not in str(error)


def test_zero_byte_pixel_data_in_memory_is_no_pixel_data() -> None:
    datasets = _series()
    datasets[4].PixelData = b""
    _refused(datasets, VolumeErrorCause.NO_PIXEL_DATA)


def test_short_pixel_data_is_undecodable() -> None:
    datasets = _series()
    datasets[1].PixelData = datasets[1].PixelData[:10]
    _refused(_round_trip(datasets), VolumeErrorCause.UNDECODABLE_PIXELS)


def test_an_empty_image_type_is_no_failure() -> None:
    """ImageType present but empty (some converters write it so) reads as None, not as a list."""
    datasets = _round_trip(_series())
    for ds in datasets:
        ds.ImageType = None
    assert volume_from_datasets(datasets).shape[0] == 6
