"""Voxel-exact check of an encoded SEG against the label volume it was built from, in numpy.

radfed's general SEG reader (:mod:`radfed.inference.dicom.seg_reader`) places any writer's frames one at a time,
which costs ~1 s for a CT with 50 lesions (842 frames). Here every frame's position, orientation, spacing,
source reference and segment number are read once from the re-read dataset (pydicom, not highdicom, which
wrote them), the frames are placed on the grid with the grid's own affine, and the stored pixels are compared
with the expected ones: bit for bit for BINARY, value for value for LABELMAP. The checks are those of the
general reader, plus exact equality; when any fails, :func:`exact_mismatch` says why and the caller falls back
to the general reader, which names the misplaced segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from radfed.inference.dicom.volume import Volume

# The general reader's tolerances (radfed.inference.dicom.seg_reader), restated because they are private there.
_IN_PLANE_TOLERANCE_VOXELS = 0.1
_THROUGH_PLANE_TOLERANCE_SLICES = 0.1
_ORIENTATION_TOLERANCE = 1e-3
_SPACING_TOLERANCE_MM = 1e-3
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.int64)


def _first(owner: Dataset | None, keyword: str) -> Dataset | None:
    if owner is None or keyword not in owner:
        return None
    items = owner[keyword].value
    return items[0] if len(items) else None


def _group(per_frame: Dataset, shared: Dataset | None, keyword: str) -> Dataset | None:
    return _first(per_frame, keyword) or _first(shared, keyword)


@dataclass(frozen=True)
class _Frames:
    """Where each stored frame goes: its grid slice and (BINARY) its segment number."""

    slices: npt.NDArray[np.int64]
    segments: npt.NDArray[np.int64] | None


def _flat_nonzero(labels: npt.NDArray[np.integer]) -> npt.NDArray[np.intp]:
    """``np.flatnonzero(labels)``, scanning 8-byte words first: lesions are a tiny part of a CT grid, and the
    word scan is ~8 times fewer elements for uint8 labels."""
    flat = labels.reshape(-1)
    if not flat.flags.c_contiguous or flat.nbytes % 8 or flat.itemsize > 8:
        return np.flatnonzero(flat)
    per_word = 8 // flat.itemsize
    words = np.flatnonzero(flat.view(np.uint64))
    candidates = (words[:, np.newaxis] * per_word + np.arange(per_word)).reshape(-1)
    return candidates[flat[candidates] != 0]


def _header_mismatch(seg: Dataset, grid: Volume) -> str | None:
    if str(seg.get("Modality", "")) != "SEG" or "SegmentSequence" not in seg:
        return "not a SEG"
    seg_for = seg.get("FrameOfReferenceUID")
    if seg_for and grid.frame_of_reference_uid and str(seg_for) != grid.frame_of_reference_uid:
        return "another Frame of Reference"
    if (int(seg.Rows), int(seg.Columns)) != grid.shape[1:]:
        return "another frame size"
    return None


def _placed(seg: Dataset, grid: Volume, binary: bool) -> _Frames | str:
    """Each frame's grid slice from its plane position, checked as the general reader checks it."""
    shared = _first(seg, "SharedFunctionalGroupsSequence")
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != int(seg.get("NumberOfFrames", 1) or 1):
        return "frame count differs from the per-frame functional groups"
    positions = np.empty((len(per_frame), 3), dtype=np.float64)
    orientations: set[tuple[float, ...]] = set()
    spacings: set[tuple[float, ...]] = set()
    references: list[tuple[int, tuple[str, int]]] = []
    segments = np.zeros(len(per_frame), dtype=np.int64)
    for index, item in enumerate(per_frame):
        position = _group(item, shared, "PlanePositionSequence")
        if position is None or "ImagePositionPatient" not in position:
            return f"frame {index + 1} has no plane position"
        positions[index] = [float(v) for v in position.ImagePositionPatient]
        orientation = _group(item, shared, "PlaneOrientationSequence")
        if orientation is not None and "ImageOrientationPatient" in orientation:
            orientations.add(tuple(float(v) for v in orientation.ImageOrientationPatient))
        measures = _group(item, shared, "PixelMeasuresSequence")
        if measures is not None and "PixelSpacing" in measures:
            spacings.add(tuple(float(v) for v in measures.PixelSpacing))
        source = _first(_first(item, "DerivationImageSequence"), "SourceImageSequence")
        if source is not None and "ReferencedSOPInstanceUID" in source:
            numbers = source.get("ReferencedFrameNumber")
            if numbers is None or numbers == "":
                frame = 1
            else:
                frame = int(numbers[0] if isinstance(numbers, list | tuple) else numbers)
            references.append((index, (str(source.ReferencedSOPInstanceUID), frame)))
        if binary:
            identification = _group(item, shared, "SegmentIdentificationSequence")
            if identification is None or "ReferencedSegmentNumber" not in identification:
                return f"frame {index + 1} has no ReferencedSegmentNumber"
            segments[index] = int(identification.ReferencedSegmentNumber)
    row = grid.affine[:3, 2] / np.linalg.norm(grid.affine[:3, 2])
    column = grid.affine[:3, 1] / np.linalg.norm(grid.affine[:3, 1])
    for iop in orientations:
        values = np.array(iop)
        if np.abs(values[:3] - row).max() > _ORIENTATION_TOLERANCE or np.abs(values[3:] - column).max() > (
            _ORIENTATION_TOLERANCE
        ):
            return "a frame's orientation differs from the grid"
    for spacing in spacings:
        if not np.allclose(spacing, grid.spacing[1:], atol=_SPACING_TOLERANCE_MM):
            return "a frame's pixel spacing differs from the grid"
    inverse = np.linalg.inv(grid.affine)
    indices = positions @ inverse[:3, :3].T + inverse[:3, 3]
    slices = np.rint(indices[:, 0]).astype(np.int64)
    off_grid = (
        (np.abs(indices[:, 1]) > _IN_PLANE_TOLERANCE_VOXELS)
        | (np.abs(indices[:, 2]) > _IN_PLANE_TOLERANCE_VOXELS)
        | (np.abs(indices[:, 0] - slices) > _THROUGH_PLANE_TOLERANCE_SLICES)
        | (slices < 0)
        | (slices >= grid.shape[0])
    )
    if off_grid.any():
        return f"frame {int(np.argmax(off_grid)) + 1} is not on the grid"
    source_slices = {source: index for index, source in enumerate(grid.slice_sources)}
    for index, reference in references:
        by_source = source_slices.get(reference)
        if by_source is not None and by_source != slices[index]:
            return f"frame {index + 1} references the source image of another slice"
    return _Frames(slices, segments if binary else None)


def _binary_mismatch(
    seg: Dataset, frames: _Frames, flat: npt.NDArray[np.intp], values: npt.NDArray[np.int64], grid: Volume
) -> str | None:
    """Every expected voxel's bit is set in the frame of its (slice, segment), and no other bit is."""
    assert frames.segments is not None
    if int(seg.get("BitsAllocated", 0)) != 1 or seg.file_meta.TransferSyntaxUID.is_compressed:
        return "not uncompressed 1-bit pixel data"
    plane = grid.shape[1] * grid.shape[2]
    packed = np.frombuffer(seg.PixelData, dtype=np.uint8)
    if len(packed) * 8 < len(frames.slices) * plane:
        return "pixel data shorter than its frames"
    width = int(max(frames.segments.max(initial=0), values.max(initial=0))) + 1
    frame_of = np.full((grid.shape[0], width), -1, dtype=np.int64)
    frame_of[frames.slices, frames.segments] = np.arange(len(frames.slices))
    if np.count_nonzero(frame_of >= 0) != len(frames.slices):
        return "two frames for the same slice and segment"
    frame = frame_of[flat // plane, values]
    if (frame < 0).any():
        return "an expected voxel has no frame"
    bits = frame * plane + flat % plane
    if not ((packed[bits >> 3] >> (bits & 7).astype(np.uint8)) & 1).all():
        return "an expected voxel is not set"
    stored = packed[packed != 0]
    if int(_POPCOUNT[stored].sum()) != len(flat):
        return "voxels are set where none is expected"
    return None


def _labelmap_mismatch(
    seg: Dataset, frames: _Frames, labels: npt.NDArray[np.integer], voxels: int, grid: Volume
) -> str | None:
    """The stored label frames equal the expected slices, and slices without a frame hold no lesion."""
    if len(np.unique(frames.slices)) != len(frames.slices):
        return "two frames for the same slice"
    pixels = np.asarray(seg.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if not np.array_equal(pixels, labels[frames.slices]):
        return "stored labels differ from the expected ones"
    if np.count_nonzero(pixels) != voxels:
        return "a slice with lesion voxels has no frame"
    return None


def exact_mismatch(seg: Dataset, expected_labels: npt.NDArray[np.integer], grid: Volume) -> str | None:
    """None when ``seg`` decodes onto ``grid`` voxel for voxel as ``expected_labels``; else the first reason not.

    Only BINARY and LABELMAP SEGs with plane positions on every frame are checked here (what radfed writes);
    anything else is a reason, and the caller's general reader decides.
    """
    reason = _header_mismatch(seg, grid)
    if reason is not None:
        return reason
    seg_type = str(seg.get("SegmentationType", ""))
    if seg_type not in ("BINARY", "LABELMAP"):
        return f"SegmentationType {seg_type!r}"
    frames = _placed(seg, grid, binary=seg_type == "BINARY")
    if isinstance(frames, str):
        return frames
    flat = _flat_nonzero(expected_labels)
    values = expected_labels.ravel()[flat].astype(np.int64)
    described = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    present = set(np.unique(values).tolist())
    if frames.segments is not None:
        present |= set(np.unique(frames.segments).tolist())
    if not present <= described:
        return f"segments {sorted(present - described)} are not described"
    if frames.segments is not None:
        return _binary_mismatch(seg, frames, flat, values, grid)
    return _labelmap_mismatch(seg, frames, expected_labels, len(flat), grid)
