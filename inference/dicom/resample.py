"""Resample a volume onto another volume's grid (e.g. ADC and DWI onto the T2W grid).

Both grids are in the same patient coordinate system (same Frame of Reference); the mapping from
reference voxel indices to moving voxel indices is one affine, so ``scipy.ndimage.affine_transform``
does the work without building coordinate arrays.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from scipy import ndimage

from radfed.inference.dicom.volume import Volume
from radfed.inference.errors import DicomInputError


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


def resample_above(moving: Volume, reference: Volume, threshold: float) -> Volume:
    """Linear resampling of ``moving`` onto ``reference`` wherever the result can reach ``threshold``; 0 elsewhere.

    A linearly interpolated value never exceeds the largest of its neighbours, so a reference voxel can reach
    the threshold only within one moving voxel of one that does. Only the reference box around those is
    resampled: a probability map with a few small lesions costs a fraction of the whole grid, with the same
    values (and so the same lesions) above the threshold.
    """
    output = np.zeros(reference.shape, dtype=np.float32)
    hot = np.argwhere(moving.array >= threshold)
    if len(hot) == 0:
        return reference.with_array(output)
    low, high = hot.min(axis=0) - 1.0, hot.max(axis=0) + 1.0
    corners = np.array([[(low, high)[k][axis] for axis, k in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    inside = reference.lps_to_index(moving.index_to_lps(corners))
    start = np.clip(np.floor(inside.min(axis=0)).astype(int), 0, reference.shape)
    stop = np.clip(np.ceil(inside.max(axis=0)).astype(int) + 1, 0, reference.shape)
    if np.any(stop <= start):
        return reference.with_array(output)
    shift = np.eye(4)
    shift[:3, 3] = start
    box = Volume(
        np.zeros(tuple(int(n) for n in stop - start), dtype=np.float32),
        reference.affine @ shift,
        reference.frame_of_reference_uid,
    )
    window = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    output[window] = resample_to(moving, box, Interpolation.LINEAR).array
    return reference.with_array(output)
