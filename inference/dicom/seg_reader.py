"""Read a DICOM SEG written by any tool into masks on a chosen series' grid.

Reference segmentations in a PACS come from many writers (3D Slicer/dcmqi, OHIF/dcmjs, highdicom,
vendor workstations), each with its own habits: frames in either order, empty frames omitted, source
references missing or partial, BINARY, FRACTIONAL or LABELMAP encodings. Every frame is placed by its
plane position on the reference grid and cross-checked against the source image it references when it
names one; what cannot be placed raises :class:`SegmentationReadError` with the reason. Nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from radfed.inference.coding import CodedTerm
from radfed.inference.dicom.volume import Volume
from radfed.inference.errors import SegmentationReadError

# A frame may sit this far (in voxels) from the reference grid and still be placed on it.
_IN_PLANE_TOLERANCE_VOXELS = 0.1
_THROUGH_PLANE_TOLERANCE_SLICES = 0.1
_ORIENTATION_TOLERANCE = 1e-3
# Segment membership in a FRACTIONAL SEG: at least half of MaximumFractionalValue (the usual reading).
FRACTIONAL_THRESHOLD = 0.5


class SegmentationType(StrEnum):
    BINARY = "BINARY"
    FRACTIONAL = "FRACTIONAL"
    LABELMAP = "LABELMAP"


@dataclass(frozen=True)
class SegmentInfo:
    """What a segment says it is."""

    segment_number: int
    label: str
    category: CodedTerm | None
    property_type: CodedTerm | None
    tracking_uid: str | None
    tracking_id: str | None


@dataclass(frozen=True, eq=False)
class SegmentationOnGrid:
    """Masks of every segment on the reference grid."""

    segments: tuple[SegmentInfo, ...]
    masks: dict[int, npt.NDArray[np.bool_]]
    grid: Volume
    sop_instance_uid: str
    # FRACTIONAL segments with stored values above 0 that all fall below the threshold (an empty mask from
    # a non-empty segment: e.g. a writer that stores 1/255 for "inside"), with their largest fraction.
    faint_segments: dict[int, float] = field(default_factory=dict)

    @property
    def empty_segments(self) -> tuple[int, ...]:
        """Segments whose mask holds no voxel, faint ones included."""
        return tuple(info.segment_number for info in self.segments if not self.masks[info.segment_number].any())

    def segment(self, number: int) -> SegmentInfo:
        for info in self.segments:
            if info.segment_number == number:
                return info
        raise KeyError(number)


def _first(sequence_owner: Dataset | None, keyword: str) -> Dataset | None:
    if sequence_owner is None or keyword not in sequence_owner:
        return None
    items = sequence_owner[keyword].value
    return items[0] if len(items) else None


def _group(per_frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    return _first(per_frame, keyword) or _first(shared, keyword)


def _segments(ds: Dataset) -> dict[int, SegmentInfo]:
    segments = {}
    for item in ds.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        segments[number] = SegmentInfo(
            segment_number=number,
            label=str(item.get("SegmentLabel", "")),
            category=CodedTerm.from_item(_first(item, "SegmentedPropertyCategoryCodeSequence")),
            property_type=CodedTerm.from_item(_first(item, "SegmentedPropertyTypeCodeSequence")),
            tracking_uid=str(item.TrackingUID) if "TrackingUID" in item else None,
            tracking_id=str(item.TrackingID) if "TrackingID" in item else None,
        )
    return segments


def _decoded_frames(ds: Dataset, seg_type: SegmentationType) -> tuple[np.ndarray, npt.NDArray[np.float32] | None]:
    """Frames as masks (BINARY, FRACTIONAL) or labels (LABELMAP), and each FRACTIONAL frame's largest fraction."""
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:
        raise SegmentationReadError(f"SEG pixel data cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if seg_type is SegmentationType.FRACTIONAL:
        maximum = float(ds.get("MaximumFractionalValue", 255) or 255)
        fractions = pixels.astype(np.float32) / np.float32(maximum)
        peaks = fractions.reshape(len(fractions), -1).max(axis=1) if fractions.size else np.zeros(0, np.float32)
        return np.asarray(fractions >= FRACTIONAL_THRESHOLD), peaks
    if seg_type is SegmentationType.BINARY:
        return np.asarray(pixels > 0), None
    return pixels, None


def _source_reference(per_frame: Dataset) -> tuple[str, int] | None:
    derivation = _first(per_frame, "DerivationImageSequence")
    source = _first(derivation, "SourceImageSequence")
    if source is None or "ReferencedSOPInstanceUID" not in source:
        return None
    frame_numbers = source.get("ReferencedFrameNumber")
    if frame_numbers is None or frame_numbers == "":
        frame = 1
    else:
        frame = int(frame_numbers[0] if isinstance(frame_numbers, list | tuple) else frame_numbers)
    return str(source.ReferencedSOPInstanceUID), frame


class _GridPlacer:
    """Places frames on the reference grid by their plane position, checking orientation and spacing.

    The grid's inverse and directions are computed once, and an orientation or spacing already accepted is
    not checked again (a SEG repeats the same few values on every frame, or shares them).
    """

    def __init__(self, grid: Volume) -> None:
        self.grid = grid
        self._inverse = np.linalg.inv(grid.affine)
        self._row = grid.affine[:3, 2] / np.linalg.norm(grid.affine[:3, 2])
        self._col = grid.affine[:3, 1] / np.linalg.norm(grid.affine[:3, 1])
        self._orientations: set[tuple[float, ...]] = set()
        self._spacings: set[tuple[float, ...]] = set()

    def _check_orientation(self, orientation: Dataset, frame_number: int) -> None:
        iop = tuple(float(v) for v in orientation.ImageOrientationPatient)
        if iop in self._orientations:
            return
        values = np.array(iop)
        if (
            np.abs(values[:3] - self._row).max() > _ORIENTATION_TOLERANCE
            or np.abs(values[3:] - self._col).max() > _ORIENTATION_TOLERANCE
        ):
            raise SegmentationReadError(
                f"frame {frame_number}: its plane orientation differs from the reference series "
                "(a SEG drawn on another plane must be resampled, which radfed refuses to guess)"
            )
        self._orientations.add(iop)

    def _check_spacing(self, measures: Dataset, frame_number: int) -> None:
        spacing = tuple(float(v) for v in measures.PixelSpacing)
        if spacing in self._spacings:
            return
        if not np.allclose(spacing, self.grid.spacing[1:], atol=1e-3):
            raise SegmentationReadError(
                f"frame {frame_number}: pixel spacing {list(spacing)} differs from the reference series "
                f"{list(np.round(self.grid.spacing[1:], 4))}"
            )
        self._spacings.add(spacing)

    def slice_of(
        self, position: Dataset | None, orientation: Dataset | None, measures: Dataset | None, frame_number: int
    ) -> int | None:
        """The grid slice of a frame, or None when it has no plane position."""
        if position is None or "ImagePositionPatient" not in position:
            return None
        if orientation is not None and "ImageOrientationPatient" in orientation:
            self._check_orientation(orientation, frame_number)
        if measures is not None and "PixelSpacing" in measures:
            self._check_spacing(measures, frame_number)
        point = np.array([float(v) for v in position.ImagePositionPatient])
        index = self._inverse[:3, :3] @ point + self._inverse[:3, 3]
        slice_index = round(float(index[0]))
        if (
            abs(index[1]) > _IN_PLANE_TOLERANCE_VOXELS
            or abs(index[2]) > _IN_PLANE_TOLERANCE_VOXELS
            or abs(index[0] - slice_index) > _THROUGH_PLANE_TOLERANCE_SLICES
            or not 0 <= slice_index < self.grid.shape[0]
        ):
            raise SegmentationReadError(
                f"frame {frame_number}: position {list(np.round(index, 3))} (slice, row, column) is not on the "
                f"reference grid of shape {list(self.grid.shape)}"
            )
        return slice_index


@dataclass(frozen=True, eq=False)
class _PlacedFrame:
    slice_index: int
    frame_number: int
    segment_number: int | None  # None for LABELMAP frames (pixel values are segment numbers)
    pixels: np.ndarray
    peak_fraction: float | None  # the largest stored fraction (FRACTIONAL frames only)


def _checked_header(ds: Dataset, grid: Volume) -> SegmentationType:
    if str(ds.get("Modality", "")) != "SEG" or "SegmentSequence" not in ds:
        raise SegmentationReadError(f"instance {ds.get('SOPInstanceUID', '?')} is not a DICOM SEG")
    seg_for = ds.get("FrameOfReferenceUID")
    if seg_for and grid.frame_of_reference_uid and str(seg_for) != grid.frame_of_reference_uid:
        raise SegmentationReadError(
            f"SEG Frame of Reference {seg_for} differs from the reference series' {grid.frame_of_reference_uid}"
        )
    try:
        seg_type = SegmentationType(str(ds.get("SegmentationType", "")))
    except ValueError as exc:
        raise SegmentationReadError(f"unknown SegmentationType {ds.get('SegmentationType')!r}") from exc
    if (int(ds.Rows), int(ds.Columns)) != grid.shape[1:]:
        raise SegmentationReadError(
            f"SEG frames are {ds.Rows}x{ds.Columns}, the reference images {grid.shape[1]}x{grid.shape[2]}"
        )
    return seg_type


def _placed_frames(ds: Dataset, grid: Volume, seg_type: SegmentationType) -> Iterator[_PlacedFrame]:
    """Every frame with the grid slice it belongs on (by geometry, cross-checked by source reference)."""
    frames, peaks = _decoded_frames(ds, seg_type)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame_groups = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    if len(per_frame_groups) != len(frames):
        raise SegmentationReadError(
            f"{len(frames)} frames but {len(per_frame_groups)} per-frame functional group items"
        )
    source_slices = {source: index for index, source in enumerate(grid.slice_sources)}
    placer = _GridPlacer(grid)
    for frame_index, (pixels, per_frame) in enumerate(zip(frames, per_frame_groups, strict=True)):
        frame_number = frame_index + 1
        by_geometry = placer.slice_of(
            _group(per_frame, shared, "PlanePositionSequence"),
            _group(per_frame, shared, "PlaneOrientationSequence"),
            _group(per_frame, shared, "PixelMeasuresSequence"),
            frame_number,
        )
        reference = _source_reference(per_frame)
        by_source = source_slices.get(reference) if reference is not None else None
        if by_geometry is not None and by_source is not None and by_geometry != by_source:
            raise SegmentationReadError(
                f"frame {frame_number}: its position places it on slice {by_geometry} but it references the "
                f"source image of slice {by_source}"
            )
        slice_index = by_geometry if by_geometry is not None else by_source
        if slice_index is None:
            why = "an image outside the reference series" if reference is not None else "no source image"
            raise SegmentationReadError(f"frame {frame_number}: no plane position and {why}: cannot be placed")
        if seg_type is SegmentationType.LABELMAP:
            yield _PlacedFrame(slice_index, frame_number, None, pixels, None)
            continue
        identification = _group(per_frame, shared, "SegmentIdentificationSequence")
        if identification is None or "ReferencedSegmentNumber" not in identification:
            raise SegmentationReadError(f"frame {frame_number}: no ReferencedSegmentNumber")
        peak = float(peaks[frame_index]) if peaks is not None else None
        yield _PlacedFrame(slice_index, frame_number, int(identification.ReferencedSegmentNumber), pixels, peak)


def _segments_of_interest(ds: Dataset, seg_type: SegmentationType) -> dict[int, SegmentInfo]:
    # A LABELMAP's segment 0, when described, is the background: it is not a segment of interest.
    return {
        number: info
        for number, info in _segments(ds).items()
        if not (seg_type is SegmentationType.LABELMAP and number == 0)
    }


def read_segmentation(ds: Dataset, grid: Volume) -> SegmentationOnGrid:
    """Place every frame of the SEG ``ds`` on ``grid`` (the series it was drawn on); one mask per segment.

    Parameters
    ----------
    ds
        A Segmentation Storage (or Label Map Segmentation Storage) instance.
    grid
        The reference series as loaded by :mod:`radfed.inference.dicom.series` (its ``slice_sources`` are
        used to cross-check source image references).
    """
    seg_type = _checked_header(ds, grid)
    segments = _segments_of_interest(ds, seg_type)
    masks = {number: np.zeros(grid.shape, dtype=bool) for number in segments}
    peaks: dict[int, float] = {}
    for frame in _placed_frames(ds, grid, seg_type):
        if frame.segment_number is None:
            for number in np.unique(frame.pixels):
                if number == 0:
                    continue
                if int(number) not in masks:
                    raise SegmentationReadError(
                        f"frame {frame.frame_number}: label {number} has no segment description"
                    )
                masks[int(number)][frame.slice_index] |= frame.pixels == number
            continue
        if frame.segment_number not in masks:
            raise SegmentationReadError(f"frame {frame.frame_number}: segment {frame.segment_number} is not described")
        masks[frame.segment_number][frame.slice_index] |= frame.pixels.astype(bool)
        if frame.peak_fraction is not None:
            peaks[frame.segment_number] = max(peaks.get(frame.segment_number, 0.0), frame.peak_fraction)
    return SegmentationOnGrid(
        segments=tuple(segments[n] for n in sorted(segments)),
        masks=masks,
        grid=grid,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        faint_segments={n: peak for n, peak in sorted(peaks.items()) if peak > 0 and not masks[n].any()},
    )


def read_segmentation_labels(ds: Dataset, grid: Volume) -> tuple[npt.NDArray[np.uint16], tuple[SegmentInfo, ...]]:
    """Like :func:`read_segmentation`, into one label volume (value = segment number).

    Memory stays at one volume whatever the number of segments; overlapping segments are refused.
    """
    seg_type = _checked_header(ds, grid)
    segments = _segments_of_interest(ds, seg_type)
    labels = np.zeros(grid.shape, dtype=np.uint16)
    for frame in _placed_frames(ds, grid, seg_type):
        target = labels[frame.slice_index]
        if frame.segment_number is None:
            values = frame.pixels.astype(np.uint16)
            present = np.flatnonzero(np.bincount(values.ravel()))  # the labels present, without sorting the frame
            unknown = set(present.tolist()) - set(segments) - {0}
            if unknown:
                raise SegmentationReadError(f"frame {frame.frame_number}: labels {sorted(unknown)} have no description")
            inside = np.nonzero(values)
            painted = values[inside]
        else:
            if frame.segment_number not in segments:
                raise SegmentationReadError(
                    f"frame {frame.frame_number}: segment {frame.segment_number} is not described"
                )
            # Index arrays, not a boolean mask: a lesion covers a few hundred of a frame's pixels.
            inside = np.nonzero(frame.pixels)
            painted = np.full(len(inside[0]), frame.segment_number, dtype=np.uint16)
        present = target[inside]
        if ((present != 0) & (present != painted)).any():
            raise SegmentationReadError(f"frame {frame.frame_number}: segments overlap (a label volume cannot hold it)")
        target[inside] = painted
    return labels, tuple(segments[n] for n in sorted(segments))
