"""Resample a volume onto another volume's grid (e.g. ADC and DWI onto the T2W grid).

Both grids are in the same patient coordinate system (same Frame of Reference); the mapping from
reference voxel indices to moving voxel indices is one affine, so ``scipy.ndimage.affine_transform``
does the work without building coordinate arrays.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from scipy import ndimage

from radfed.inference.errors import DicomInputError
from radfed.inference.volume import Volume


class Interpolation(StrEnum):
    NEAREST = "nearest"  # labels and masks
    LINEAR = "linear"  # intensities
    CUBIC = "cubic"

    @property
    def spline_order(self) -> int:
        return {"nearest": 0, "linear": 1, "cubic": 3}[self.value]


def resample_to(
    moving: Volume,
    reference: Volume,
    interpolation: Interpolation | str = Interpolation.LINEAR,
    *,
    fill_value: float = 0.0,
    require_same_frame_of_reference: bool = True,
) -> Volume:
    """Sample ``moving`` at every voxel centre of ``reference``'s grid.

    Parameters
    ----------
    moving
        The volume to resample.
    reference
        The grid to resample onto; its geometry is kept.
    interpolation
        ``nearest`` for labels, ``linear`` (default) or ``cubic`` for intensities.
    fill_value
        Value where the reference grid lies outside the moving volume.
    require_same_frame_of_reference
        Refuse volumes whose Frame of Reference UIDs differ (their coordinates are unrelated).
    """
    interpolation = Interpolation(interpolation)
    if (
        require_same_frame_of_reference
        and moving.frame_of_reference_uid
        and reference.frame_of_reference_uid
        and moving.frame_of_reference_uid != reference.frame_of_reference_uid
    ):
        raise DicomInputError(
            "cannot resample across Frames of Reference "
            f"({moving.frame_of_reference_uid} onto {reference.frame_of_reference_uid}): "
            "no registration is known"
        )
    # reference index -> LPS -> moving index
    transform = np.linalg.inv(moving.affine) @ reference.affine
    # Snap float noise (1e-16) to exact values: in "constant" mode a coordinate of -1e-16 counts as
    # outside, which would blank a whole face of an identical grid.
    snapped = np.round(transform)
    near = np.abs(transform - snapped) < 1e-9
    transform[near] = snapped[near]
    source = moving.array
    if interpolation is not Interpolation.NEAREST and not np.issubdtype(source.dtype, np.floating):
        source = source.astype(np.float32)
    output = ndimage.affine_transform(
        source,
        transform[:3, :3],
        offset=transform[:3, 3],
        output_shape=reference.shape,
        order=interpolation.spline_order,
        mode="constant",
        cval=fill_value,
        prefilter=interpolation is Interpolation.CUBIC,
    )
    return Volume(output, reference.affine.copy(), reference.frame_of_reference_uid, reference.slice_sources)
