"""Resampling onto another series' grid: exact on linear fields, right place for lesions, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from radfed.inference.dicom.resample import resample_above, resample_to
from radfed.inference.dicom.series import volume_from_datasets
from radfed.inference.dicom.volume import Volume, same_grid
from radfed.inference.errors import DicomInputError
from radfed.inference.testing.synthetic.sites import Sequence, SeriesGrid
from radfed.inference.testing.synthetic.study import SyntheticStudy, grid_volume


def _linear_field(volume: Volume, gradient: np.ndarray, offset: float) -> Volume:
    s, r, c = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    points = volume.index_to_lps(np.stack([s, r, c], axis=-1))
    return volume.with_array((points @ gradient + offset).astype(np.float64))


def test_linear_interpolation_is_exact_on_a_linear_field() -> None:
    centre = np.array([5.0, 10.0, -60.0])
    tilt = np.deg2rad(17)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(tilt), np.sin(tilt)])
    coarse = grid_volume(SeriesGrid(40, 40, 12, 2.0, 4.0), centre, [1, 0, 0], [0, 1, 0])
    fine = grid_volume(SeriesGrid(50, 50, 10, 1.1, 3.0), centre, row, col)
    gradient = np.array([0.3, -0.7, 1.1])
    moving = _linear_field(coarse, gradient, 50.0)
    result = resample_to(moving, fine, fill_value=np.nan)
    expected = _linear_field(fine, gradient, 50.0).array
    inside = ~np.isnan(result.array)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(result.array[inside], expected[inside], atol=1e-6)
    assert same_grid(result, fine)


def test_identity_resampling_changes_nothing(small_study: SyntheticStudy) -> None:
    t2 = volume_from_datasets(small_study.series[Sequence.T2W])
    np.testing.assert_allclose(resample_to(t2, t2).array, t2.array, atol=1e-3)


def test_dwi_lesions_land_on_t2w_lesions(small_study: SyntheticStudy) -> None:
    """Lesions are bright on DWI: after resampling, the DWI signal inside T2W lesion voxels is high."""
    t2 = volume_from_datasets(small_study.series[Sequence.T2W])
    dwi = resample_to(volume_from_datasets(small_study.series[Sequence.DWI]), t2)
    lesion = small_study.lesion_masks > 0
    gland = np.zeros_like(lesion)
    s, r, c = np.meshgrid(*(np.arange(n) for n in t2.shape), indexing="ij")
    points = t2.index_to_lps(np.stack([s.ravel(), r.ravel(), c.ravel()], axis=1))
    gland = small_study.phantom.gland_at(points).reshape(t2.shape) & ~lesion
    assert dwi.array[lesion].mean() > 1.8 * dwi.array[gland].mean()


def test_nearest_keeps_labels(small_study: SyntheticStudy) -> None:
    t2 = volume_from_datasets(small_study.series[Sequence.T2W])
    labels = t2.with_array(small_study.lesion_masks)
    dwi_grid = volume_from_datasets(small_study.series[Sequence.DWI])
    on_dwi = resample_to(labels, dwi_grid, "nearest")
    assert on_dwi.array.dtype == np.uint8
    assert set(np.unique(on_dwi.array)) <= set(np.unique(small_study.lesion_masks))


def test_refuses_unrelated_frames_of_reference(small_study: SyntheticStudy) -> None:
    t2 = volume_from_datasets(small_study.series[Sequence.T2W])
    other = Volume(t2.array, t2.affine, "1.2.3.4", t2.slice_sources)
    with pytest.raises(DicomInputError, match="Frames of Reference"):
        resample_to(other, t2)


@pytest.mark.parametrize("angle_deg", [0.0, 17.0])
def test_resampling_above_a_threshold_keeps_every_voxel_that_reaches_it(angle_deg: float) -> None:
    """The node resamples its probability map only around voxels at or above the lesion threshold: every
    reference voxel reaching the threshold must come out exactly as with the whole-grid resampling."""
    rng = np.random.default_rng(3)
    theta = np.radians(angle_deg)
    rotation = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    model_affine = np.eye(4)
    model_affine[:3, :3] = rotation @ np.diag([3.0, 1.5, 1.5])
    model_affine[:3, 3] = [-30.0, -40.0, -35.0]
    probability = np.clip(rng.normal(0.1, 0.05, (20, 50, 50)), 0, 1).astype(np.float32)
    for s, r, c in [(5, 10, 12), (12, 30, 35), (18, 47, 2)]:  # small lesions, one at the edge
        probability[s - 1 : s + 2, r - 2 : r + 3, c - 2 : c + 3] = rng.uniform(0.6, 0.95, (3, 5, 5))
    moving = Volume(probability, model_affine)
    reference_affine = np.eye(4)
    reference_affine[:3, :3] = np.diag([3.3, 0.7, 0.7])
    reference_affine[:3, 3] = [-32.0, -45.0, -40.0]
    reference = Volume(np.zeros((20, 120, 120), np.float32), reference_affine)
    whole = resample_to(moving, reference, "linear").array
    boxed = resample_above(moving, reference, 0.5).array
    above = whole >= 0.5
    assert above.sum() > 100  # the lesions are on the reference grid
    np.testing.assert_allclose(boxed[above], whole[above], rtol=0, atol=1e-6)
    assert not np.any(boxed[~above] >= 0.5)
    assert not resample_above(moving.with_array(np.zeros_like(probability)), reference, 0.5).array.any()
