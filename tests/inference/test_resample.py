"""Resampling onto another series' grid: exact on linear fields, right place for lesions, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from radfed.inference.errors import DicomInputError
from radfed.inference.resample import resample_to
from radfed.inference.series import volume_from_datasets
from radfed.inference.synthetic.sites import Sequence, SeriesGrid
from radfed.inference.synthetic.study import SyntheticStudy, grid_volume
from radfed.inference.volume import Volume, same_grid


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
