"""A volume: voxels on a regular grid with an exact affine into patient coordinates (LPS, mm).

Index order is ``(slice, row, column)`` everywhere in radfed, the order of ``pixel_array`` stacked along
the slice axis; :attr:`Volume.affine` maps ``(slice, row, column, 1)`` to DICOM patient coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels plus geometry.

    Parameters
    ----------
    array
        Voxel values, shape ``(slices, rows, columns)``; modality values (rescale applied).
    affine
        4 x 4 matrix from ``(slice, row, column, 1)`` to LPS millimetres.
    frame_of_reference_uid
        The DICOM Frame of Reference the affine lives in, when known.
    slice_sources
        For each slice, ``(SOP Instance UID, frame number)`` of the image it came from (frame
        numbers are 1-based; 1 for single-frame instances); results reference source images by it.
    """

    array: np.ndarray
    affine: FloatArray
    frame_of_reference_uid: str | None = None
    slice_sources: tuple[tuple[str, int], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"array must be 3-D (slice, row, column), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4 x 4, got {self.affine.shape}")
        if self.slice_sources and len(self.slice_sources) != self.array.shape[0]:
            raise ValueError("slice_sources must name one source per slice")

    @property
    def shape(self) -> tuple[int, int, int]:
        s, r, c = self.array.shape
        return int(s), int(r), int(c)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm along (slice, row, column)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    @property
    def slice_normal(self) -> FloatArray:
        """Unit normal of the image plane (row direction x column direction)."""
        row_dir = self.affine[:3, 2] / np.linalg.norm(self.affine[:3, 2])
        col_dir = self.affine[:3, 1] / np.linalg.norm(self.affine[:3, 1])
        normal = np.cross(row_dir, col_dir)
        return np.asarray(normal / np.linalg.norm(normal), dtype=np.float64)

    def index_to_lps(self, indices: npt.ArrayLike) -> FloatArray:
        """Map ``(..., 3)`` voxel indices (slice, row, column) to LPS mm."""
        idx = np.asarray(indices, dtype=np.float64)
        return np.asarray(idx @ self.affine[:3, :3].T + self.affine[:3, 3], dtype=np.float64)

    def lps_to_index(self, points: npt.ArrayLike) -> FloatArray:
        """Map ``(..., 3)`` LPS points to fractional voxel indices (slice, row, column)."""
        inverse = np.linalg.inv(self.affine)
        pts = np.asarray(points, dtype=np.float64)
        return np.asarray(pts @ inverse[:3, :3].T + inverse[:3, 3], dtype=np.float64)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid holding other voxel values (e.g. a mask)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.affine, self.frame_of_reference_uid, self.slice_sources)


def same_grid(a: Volume, b: Volume, tolerance_mm: float = 1e-3) -> bool:
    """Whether two volumes share shape and geometry (every voxel centre within tolerance)."""
    if a.shape != b.shape:
        return False
    corners = np.array(
        [[s, r, c] for s in (0, a.shape[0] - 1) for r in (0, a.shape[1] - 1) for c in (0, a.shape[2] - 1)],
        dtype=np.float64,
    )
    return bool(np.all(np.abs(a.index_to_lps(corners) - b.index_to_lps(corners)) <= tolerance_mm))
