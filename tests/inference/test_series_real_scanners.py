"""The loader against real GE and Siemens series, compared with dcm2niix's reference NIfTI files.

dcm2niix writes RAS and may flip the row axis, so geometry is compared voxel by voxel in world space:
every voxel centre of radfed's volume, mapped into the reference's index space, must land on an integer
index (within 1e-3 mm) holding the same value.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radfed.inference.dicom.series import load_series_folder
from radfed.inference.dicom.study_source import FolderStudy

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])

# (input series, dcm2niix reference, what it exercises)
CASES = [
    ("In/20180918GE/mr_0004", "DCM2NIIX_regression_test_4", "GE 4-D EPI, interleaved"),
    ("In/20180918GE/mr_0005", "DCM2NIIX_regression_test_5", "GE 4-D EPI"),
    ("In/20180918GE/mr_0006", "DCM2NIIX_regression_test_6", "GE 4-D EPI"),
    ("In/20180918GE/mr_0007", "DCM2NIIX_regression_test_7", "GE 4-D EPI"),
    ("In/20180918Si/mr_0003", "EPI_PE-AP_3", "Siemens mosaic"),
    ("In/20180918Si/mr_0004", "EPI_PE-PA_4", "Siemens mosaic"),
    ("In/20180918Si/mr_0005", "EPI_PE-RL_5", "Siemens mosaic"),
    ("In/20180918Si/mr_0006", "EPI_PE-LR_6", "Siemens mosaic"),
]


@pytest.mark.parametrize(("series", "reference", "kind"), CASES, ids=[c[1] for c in CASES])
def test_volume_matches_dcm2niix(shared_data: Path, series: str, reference: str, kind: str) -> None:
    root = shared_data / "dcm_qa_nih"
    volume = load_series_folder(root / series)
    image = nib.load(root / "Ref" / f"{reference}.nii")
    ref_data = np.asarray(image.dataobj)
    if ref_data.ndim == 4:
        ref_data = ref_data[..., 0]  # the loader returns the first volume of a 4-D series
    assert sorted(volume.shape) == sorted(ref_data.shape), kind

    grid = np.stack(np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij"), axis=-1).reshape(-1, 3)
    ras = volume.index_to_lps(grid) * LPS_TO_RAS
    ref_index = (ras - image.affine[:3, 3]) @ np.linalg.inv(image.affine[:3, :3]).T
    rounded = np.rint(ref_index)
    # Index error times voxel size bounds the position error in mm.
    position_error_mm = np.abs(ref_index - rounded) * np.asarray(image.header.get_zooms()[:3])
    assert position_error_mm.max() < 1e-3
    assert rounded.min() == 0
    assert np.all(rounded.max(axis=0) == np.array(ref_data.shape) - 1)
    i, j, k = rounded.astype(int).T
    np.testing.assert_array_equal(volume.array.reshape(-1), ref_data[i, j, k])


def test_spacing_from_positions_not_header(shared_data: Path) -> None:
    """GE says SliceThickness 3 and SpacingBetweenSlices 5: the positions decide (5 mm)."""
    volume = load_series_folder(shared_data / "dcm_qa_nih" / "In/20180918GE/mr_0004")
    assert volume.spacing == pytest.approx((5.0, 3.75, 3.75), abs=1e-4)


@pytest.mark.parametrize(("series", "reference", "kind"), CASES, ids=[c[1] for c in CASES])
def test_selection_counts_the_slices_of_one_volume(shared_data: Path, series: str, reference: str, kind: str) -> None:
    """4-D series count one volume's slices: distinct positions (GE), the tiles of a mosaic (Siemens)."""
    root = shared_data / "dcm_qa_nih"
    (info,) = FolderStudy(root / series).series()
    image = nib.load(root / "Ref" / f"{reference}.nii")
    assert info.slices == image.shape[2], kind
