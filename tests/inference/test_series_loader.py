"""Series -> volume: exact geometry on synthetic series, every refusal named, every encoding decoded."""

from __future__ import annotations

import copy
import io

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from radfed.inference.dicom.series import volume_from_datasets
from radfed.inference.errors import NotAVolumeError, VolumeErrorCause
from radfed.inference.redaction import uid_digest
from radfed.inference.testing.synthetic.sites import Sequence
from radfed.inference.testing.synthetic.study import SyntheticStudy


def _t2w(study: SyntheticStudy) -> list[Dataset]:
    return [copy.deepcopy(ds) for ds in study.series[Sequence.T2W]]


def test_geometry_matches_generator_grid(small_study: SyntheticStudy) -> None:
    """Shuffled instances still give the generator's own grid (axial or oblique) to 1e-4 mm."""
    datasets = _t2w(small_study)
    rng = np.random.default_rng(0)
    rng.shuffle(datasets)  # type: ignore[arg-type]
    volume = volume_from_datasets(datasets)
    np.testing.assert_allclose(volume.affine, small_study.t2w_grid.affine, atol=1e-4)
    assert volume.frame_of_reference_uid == small_study.identity.frame_of_reference_uid
    # slice sources follow the spatial order, whatever the instance numbering
    assert [uid for uid, _ in volume.slice_sources] == [ds.SOPInstanceUID for ds in small_study.series[Sequence.T2W]]


def test_oblique_series_affine_is_not_axial() -> None:
    from radfed.inference.testing.synthetic.sites import site_profile
    from radfed.inference.testing.synthetic.study import render_study

    site = site_profile(3, small=True)
    study = next(s for s in (render_study(site, n, 5) for n in range(1, 30)) if s.oblique)
    volume = volume_from_datasets(study.series[Sequence.T2W])
    normal = volume.slice_normal
    assert abs(normal[2]) < 0.99  # tilted away from the pure axial normal
    np.testing.assert_allclose(volume.affine, study.t2w_grid.affine, atol=1e-4)


def test_rescale_slope_is_applied(small_study: SyntheticStudy) -> None:
    datasets = _t2w(small_study)
    plain = volume_from_datasets(datasets)
    for ds in datasets:
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-10"
    scaled = volume_from_datasets(datasets)
    np.testing.assert_allclose(scaled.array, plain.array * 2 - 10)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=["rle", "jpeg-ls", "j2k"])
def test_compressed_series_decode_identically(small_study: SyntheticStudy, syntax: str) -> None:
    datasets = _t2w(small_study)[:4]
    plain = volume_from_datasets(datasets)
    for ds in datasets:
        ds.compress(syntax)
    assert datasets[0].file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(volume_from_datasets(datasets).array, plain.array)


def test_enhanced_multiframe_matches_classic(small_study: SyntheticStudy) -> None:
    classic = _t2w(small_study)
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=classic,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    a = volume_from_datasets(classic)
    b = volume_from_datasets([enhanced])
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    np.testing.assert_array_equal(b.array, a.array)
    assert {uid for uid, _ in b.slice_sources} == {enhanced.SOPInstanceUID}


def _expect(cause: VolumeErrorCause, datasets: list[Dataset], **kwargs: bool) -> NotAVolumeError:
    with pytest.raises(NotAVolumeError) as info:
        volume_from_datasets(datasets, **kwargs)
    assert info.value.cause is cause, str(info.value)
    assert isinstance(info.value, ValueError)  # the builtin it also is
    return info.value


def test_refuses_missing_positions(small_study: SyntheticStudy) -> None:
    datasets = _t2w(small_study)
    del datasets[3].ImagePositionPatient
    error = _expect(VolumeErrorCause.MISSING_GEOMETRY, datasets)
    assert "ImagePositionPatient" in str(error)


def test_refuses_mixed_orientations(small_study: SyntheticStudy) -> None:
    datasets = _t2w(small_study)
    datasets[2].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    _expect(VolumeErrorCause.MIXED_ORIENTATIONS, datasets)


def test_refuses_mixed_sizes(small_study: SyntheticStudy) -> None:
    datasets = _t2w(small_study)
    datasets[1].PixelSpacing = [0.9, 0.9]
    _expect(VolumeErrorCause.MIXED_SIZES, datasets)


def test_refuses_localizer(small_study: SyntheticStudy) -> None:
    datasets = _t2w(small_study)
    datasets[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    _expect(VolumeErrorCause.LOCALIZER, datasets)


def test_single_slice_needs_permission(small_study: SyntheticStudy) -> None:
    datasets = _t2w(small_study)[:1]
    _expect(VolumeErrorCause.SINGLE_SLICE, datasets)
    volume = volume_from_datasets(datasets, allow_single_slice=True)
    assert volume.shape[0] == 1


def test_refuses_a_gap(small_study: SyntheticStudy) -> None:
    datasets = _t2w(small_study)
    del datasets[len(datasets) // 2]
    error = _expect(VolumeErrorCause.IRREGULAR_SPACING, datasets)
    assert "gaps" in str(error)


def test_refuses_uneven_repeats(small_study: SyntheticStudy) -> None:
    datasets = _t2w(small_study)
    duplicate = copy.deepcopy(datasets[0])
    duplicate.SOPInstanceUID = hd.UID()
    _expect(VolumeErrorCause.DUPLICATE_POSITIONS, [*datasets, duplicate])


def test_four_d_series_gives_first_time_point(small_study: SyntheticStudy) -> None:
    first = _t2w(small_study)
    second = _t2w(small_study)
    for ds in first:
        ds.TemporalPositionIdentifier = 1
    for ds in second:
        ds.TemporalPositionIdentifier = 2
        ds.SOPInstanceUID = hd.UID()
        arr = ds.pixel_array + 7
        ds.PixelData = arr.astype(np.uint16).tobytes()
    volume = volume_from_datasets([*second, *first])
    np.testing.assert_array_equal(volume.array, volume_from_datasets(first).array)


def test_refuses_two_series(small_study: SyntheticStudy) -> None:
    _expect(
        VolumeErrorCause.MULTIPLE_SERIES,
        [*small_study.series[Sequence.T2W], *small_study.series[Sequence.ADC]],
    )


def test_refuses_segmentation_objects(small_study: SyntheticStudy) -> None:
    _expect(VolumeErrorCause.NOT_AN_IMAGE, [small_study.reference_seg])


def test_corrupt_pixel_data_is_named(small_study: SyntheticStudy) -> None:
    datasets = _t2w(small_study)
    datasets[5].PixelData = datasets[5].PixelData[:100]
    error = _expect(VolumeErrorCause.UNDECODABLE_PIXELS, datasets)
    assert uid_digest(datasets[5].SOPInstanceUID) in str(error) and datasets[5].SOPInstanceUID not in str(error)


def test_jpeg_baseline_series(small_study: SyntheticStudy) -> None:
    """8-bit JPEG baseline (what many secondary exports use), encoded here with Pillow, loads through
    pydicom's JPEG handler with the geometry of the uncompressed series."""
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    datasets = _t2w(small_study)[:4]
    plain = volume_from_datasets(datasets)
    scale = 255.0 / float(plain.array.max())
    expected = []
    for ds in datasets:
        eight_bit = np.clip(ds.pixel_array * scale, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(eight_bit).save(buffer, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PhotometricInterpretation = "MONOCHROME2"
        expected.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32))
    volume = volume_from_datasets(datasets)
    np.testing.assert_allclose(volume.affine, plain.affine)
    # Two JPEG decoders (libjpeg in pylibjpeg, Pillow's) agree within rounding.
    assert np.abs(volume.array - np.stack(expected)).max() <= 2
