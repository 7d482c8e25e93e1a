"""Quality assurance before storage: re-read what was encoded and compare it with what was meant.

The SEG is decoded by radfed's independent reader (placing frames by geometry on the reference grid);
each segment's centroid and extent in patient coordinates (mm) must match the mask it came from.
Flipped and shifted SEGs are the most reported AI-result bug; this is where they are stopped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from radfed.dicom_sr.profile import SrVariant
from radfed.inference.errors import ResultQualityError
from radfed.inference.findings import InferenceResult
from radfed.inference.segmentation import read_segmentation_labels
from radfed.inference.volume import Volume


def encoded(ds: Dataset) -> Dataset:
    """The dataset as a receiver will see it: written to bytes and read back."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@dataclass(frozen=True)
class _Placement:
    voxels: int
    centroid_lps: np.ndarray
    corners_lps: np.ndarray  # LPS of the index bounding box's two extreme corners


def _placements(labels: npt.NDArray[np.integer], grid: Volume) -> dict[int, _Placement]:
    """Voxel count, centroid and bounding box per label, from the labelled voxels only (lesions are a
    tiny fraction of a CT grid, so this stays fast where whole-volume reductions would not)."""
    flat = np.flatnonzero(labels)
    if not len(flat):
        return {}
    values = labels.ravel()[flat].astype(np.int64)
    index = np.stack(np.unravel_index(flat, labels.shape), axis=1)
    order = np.argsort(values, kind="stable")
    values, index = values[order], index[order]
    numbers, starts, counts = np.unique(values, return_index=True, return_counts=True)
    placements = {}
    for number, start, count in zip(numbers, starts, counts, strict=True):
        block = index[start : start + count]
        corners = np.array([block.min(axis=0), block.max(axis=0)], dtype=np.float64)
        placements[int(number)] = _Placement(
            int(count), grid.index_to_lps(block.mean(axis=0)), grid.index_to_lps(corners)
        )
    return placements


def verify_seg_geometry(
    seg: Dataset, expected_labels: npt.NDArray[np.integer], grid: Volume, *, tolerance_mm: float = 0.1
) -> None:
    """Raise :class:`ResultQualityError` unless every segment decodes to where it was computed.

    Parameters
    ----------
    seg
        The encoded SEG (as read back from bytes).
    expected_labels
        The label volume on ``grid`` the SEG was built from (value = segment number).
    grid
        The reference series' grid.
    tolerance_mm
        Allowed difference of centroid and bounding-box corners, in mm.
    """
    decoded_labels, _segments = read_segmentation_labels(seg, grid)
    expected = _placements(expected_labels, grid)
    decoded = _placements(decoded_labels, grid)
    for number, want in expected.items():
        got = decoded.get(number)
        if got is None:
            raise ResultQualityError(f"segment {number} is missing from the encoded SEG")
        if got.voxels != want.voxels:
            raise ResultQualityError(f"segment {number}: {got.voxels} voxels decoded, {want.voxels} expected")
        shift = float(np.linalg.norm(got.centroid_lps - want.centroid_lps))
        corners = float(np.abs(got.corners_lps - want.corners_lps).max())
        if shift > tolerance_mm or corners > tolerance_mm:
            raise ResultQualityError(
                f"segment {number} decodes {shift:.2f} mm from where it was computed (extent off by "
                f"{corners:.2f} mm): refusing to store a misplaced SEG"
            )
    extra = set(decoded) - set(expected)
    if extra:
        raise ResultQualityError(f"encoded SEG has unexpected segments {sorted(extra)}")


def verify_sr(sr: Dataset, result: InferenceResult, variant: SrVariant) -> None:
    """Re-read the SR with highdicom and check what viewers rely on."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True)
    if report.ContentSequence is None or report.ConceptNameCodeSequence[0].CodeValue != "126000":
        raise ResultQualityError("SR root concept is not TID 1500 Imaging Measurement Report (DCM 126000)")
    # Read each group's tracking UID and references once (highdicom re-parses on every access).
    volumetric: dict[int, list[str]] = {}
    content: hd.sr.MeasurementReport = report.content  # type: ignore[assignment]
    for group in content.get_volumetric_roi_measurement_groups():
        segment = group.referenced_segment
        numbers = segment.referenced_segment_numbers if segment is not None else []
        for number in numbers or []:
            volumetric.setdefault(int(number), []).append(str(group.tracking_uid))
    outlines: dict[str, list[np.ndarray]] = {}
    for planar in content.get_planar_roi_measurement_groups():
        if planar.roi is not None:
            outlines.setdefault(str(planar.tracking_uid), []).append(np.asarray(planar.roi.value))
    rows, columns = result.grid.shape[1:]
    for lesion in result.lesions:
        uids = volumetric.get(lesion.number, [])
        if len(uids) != 1:
            raise ResultQualityError(f"lesion {lesion.number}: {len(uids)} volumetric groups reference its segment")
        if variant is SrVariant.VIEWER:
            twins = outlines.get(uids[0], [])
            if len(twins) != 1:
                raise ResultQualityError(f"lesion {lesion.number}: no planar outline sharing Tracking UID {uids[0]}")
            points = twins[0]
            if points.min() < 0 or points[:, 0].max() > columns or points[:, 1].max() > rows:
                raise ResultQualityError(f"lesion {lesion.number}: outline leaves the image")
    by_uid = {uid for uids in volumetric.values() for uid in uids}
    if len(by_uid) != len(result.lesions):
        raise ResultQualityError(f"{len(by_uid)} lesion groups for {len(result.lesions)} lesions")
