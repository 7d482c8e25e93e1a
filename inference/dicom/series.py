"""DICOM series -> :class:`~radfed.inference.dicom.volume.Volume` with an exact affine.

Handles single-frame images, enhanced multi-frame MR/CT (per-frame functional groups), Siemens mosaics,
4-D series (the first time point is returned) and every transfer syntax pydicom's pixel handlers decode.
Instances without an image (a Philips Raw Data object beside its images) are skipped. Several images per
position that are not time points (echoes, magnitude and phase, b-values) are refused unless a
:class:`FramePick` chooses one kind. What cannot be one regular 3-D grid raises :class:`NotAVolumeError`
naming the cause.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from radfed.inference.dicom import siemens_csa
from radfed.inference.dicom.frames import (
    POSITION_TOLERANCE_MM,
    FrameKind,
    frame_facts,
    functional_group,
    is_enhanced,
    non_image_reason,
)
from radfed.inference.dicom.volume import Volume
from radfed.inference.errors import DicomInputError, NotAVolumeError, VolumeErrorCause
from radfed.inference.redaction import error_text, uid_digest

logger = logging.getLogger(__name__)

# Direction cosines of real scanners agree to ~1e-6; 1e-4 still separates a 0.006 degree tilt.
_ORIENTATION_TOLERANCE = 1e-4
_RELATIVE_SPACING_TOLERANCE = 0.01


@dataclass(frozen=True)
class _Frame:
    """One 2-D image plane of a series, with its geometry and how to get its pixels."""

    position: np.ndarray  # LPS of the centre of the first transmitted pixel
    row_cosine: np.ndarray  # direction of increasing column index
    column_cosine: np.ndarray  # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int
    pixels: Callable[[], np.ndarray]
    source: tuple[str, int]  # (SOP Instance UID, frame number)
    temporal_key: tuple[float, ...]  # orders frames sharing a position (4-D series)
    kind: FrameKind  # frames of one kind at one position are time points of one image


@dataclass(frozen=True)
class FramePick:
    """Which kind of image a channel wants where a series holds several at each slice position.

    ``image_type_any``: keep the frames whose ImageType (FrameType) has one of these values;
    ``min_b_value``: keep the highest b-value if it is at least this; ``echo_time_ms``: keep that echo.
    A criterion that matches every frame, or none, picks nothing.
    """

    image_type_any: tuple[str, ...] = ()
    min_b_value: float | None = None
    echo_time_ms: float | None = None


def read_series_files(paths: Iterable[Path]) -> list[Dataset]:
    """Read DICOM files (skipping nothing silently: a non-DICOM file raises)."""
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError) as exc:
            raise DicomInputError(f"{path.name}: not a readable DICOM file ({error_text(exc)})") from exc
    return datasets


def dicom_files_in(folder: Path) -> list[Path]:
    """Files of a folder that carry the DICOM preamble (``DICM`` at byte 128), sorted by name."""
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        with path.open("rb") as handle:
            header = handle.read(132)
        if header[128:132] == b"DICM":
            found.append(path)
    return found


def load_series_folder(folder: Path, *, allow_single_slice: bool = False) -> Volume:
    """Load the one series stored in ``folder`` (DICOM files, any name)."""
    paths = dicom_files_in(folder)
    if not paths:
        raise NotAVolumeError(VolumeErrorCause.EMPTY, f"no DICOM files in {folder}")
    return volume_from_datasets(read_series_files(paths), allow_single_slice=allow_single_slice)


def volume_from_datasets(
    datasets: Sequence[Dataset], *, allow_single_slice: bool = False, pick: FramePick | None = None
) -> Volume:
    """Assemble the instances of one series into a volume.

    Parameters
    ----------
    datasets
        All instances of one series, in any order. Instances that hold no image are skipped.
    allow_single_slice
        Accept a single plane (a volume of one slice whose thickness is SliceThickness).
    pick
        Which kind of image to keep where each position holds several (echoes, image types, b-values).
    """
    if not datasets:
        raise NotAVolumeError(VolumeErrorCause.EMPTY, "no instances")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) > 1:
        raise NotAVolumeError(VolumeErrorCause.MULTIPLE_SERIES, f"{len(series_uids)} series mixed")
    images = image_instances(datasets)
    frames = [frame for ds in images for frame in _frames_of(ds)]
    n_images = len(frames)
    frames = _one_volume(frames, pick or FramePick())
    if len(frames) == 1 < n_images and not allow_single_slice:
        # One position repeated is not a volume with one slice: say what is wrong with it.
        raise NotAVolumeError(VolumeErrorCause.DUPLICATE_POSITIONS, f"all {n_images} images lie at one position")
    return _assemble(frames, images[0], allow_single_slice=allow_single_slice)


def image_instances(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The instances that hold an image; raises NOT_AN_IMAGE when none does."""
    images, skipped = [], []
    for ds in datasets:
        reason = non_image_reason(ds)
        if reason is None:
            images.append(ds)
        else:
            skipped.append(f"instance {_named(ds)}: {reason}")
    if not images:
        raise NotAVolumeError(
            VolumeErrorCause.NOT_AN_IMAGE, f"no image among {len(datasets)} instance(s): {'; '.join(skipped[:3])}"
        )
    if skipped:
        logger.info("skipping %d of %d instances that hold no image", len(skipped), len(datasets))
    return images


def _frames_of(ds: Dataset) -> list[_Frame]:
    if not _has_pixel_bytes(ds):
        raise NotAVolumeError(VolumeErrorCause.NO_PIXEL_DATA, f"instance {_named(ds)} is an image without pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise NotAVolumeError(
            VolumeErrorCause.NOT_GRAYSCALE,
            f"instance {_named(ds)} has {ds.SamplesPerPixel} samples per pixel "
            f"({ds.get('PhotometricInterpretation', '?')})",
        )
    image_type = [str(v).upper() for v in ds.get("ImageType") or []]  # present but empty reads as None
    if "LOCALIZER" in image_type:
        raise NotAVolumeError(VolumeErrorCause.LOCALIZER, f"instance {_named(ds)} is a localizer")
    if is_enhanced(ds):
        return _enhanced_frames(ds)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise NotAVolumeError(
            VolumeErrorCause.MISSING_GEOMETRY,
            f"instance {_named(ds)} has {ds.NumberOfFrames} frames but no per-frame geometry",
        )
    if "MOSAIC" in image_type:
        return _mosaic_frames(ds)
    return [_classic_frame(ds)]


def _has_pixel_bytes(ds: Dataset) -> bool:
    """Whether a pixel data element is present and not empty (a 0-byte PixelData reads back as None)."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            value = ds[keyword].value
            if value is not None and len(value) > 0:
                return True
    return False


def _sop(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "?"))


def _named(ds: Dataset) -> str:
    """The instance as messages name it: a short hash of its SOP Instance UID (job reasons are logged and shown in
    Orthanc Explorer)."""
    return uid_digest(str(ds.get("SOPInstanceUID", "")))


def _vector(values: object, n: int, what: str, ds: Dataset) -> np.ndarray:
    try:
        vec = np.array([float(v) for v in values], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, f"{what} unreadable in {_named(ds)}") from exc
    if vec.shape != (n,) or not np.all(np.isfinite(vec)):
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, f"{what} malformed in {_named(ds)}")
    return vec


def _pixel_spacing(values: object, ds: Dataset) -> np.ndarray:
    spacing = _vector(values, 2, "PixelSpacing", ds)
    if not np.all(spacing > 0):
        raise NotAVolumeError(
            VolumeErrorCause.MISSING_GEOMETRY, f"PixelSpacing {spacing.tolist()} is not positive in {_named(ds)}"
        )
    return spacing


def _orientation(values: object, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    iop = _vector(values, 6, "ImageOrientationPatient", ds)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise NotAVolumeError(
            VolumeErrorCause.MISSING_GEOMETRY, f"ImageOrientationPatient not orthonormal in {_named(ds)}"
        )
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _rescaled(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    values = raw.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _decode(ds: Dataset) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:
        raise NotAVolumeError(VolumeErrorCause.UNDECODABLE_PIXELS, f"instance {_named(ds)}: {error_text(exc)}") from exc


def _temporal_key(ds: Dataset) -> tuple[float, ...]:
    keys = []
    for keyword in ("TemporalPositionIdentifier", "AcquisitionNumber", "InstanceNumber"):
        value = ds.get(keyword)
        try:
            keys.append(float(value) if value not in (None, "") else 0.0)
        except (TypeError, ValueError):
            keys.append(0.0)
    return tuple(keys)


def _classic_frame(ds: Dataset) -> _Frame:
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, f"{', '.join(missing)} missing in {_named(ds)}")
    row, col = _orientation(ds.ImageOrientationPatient, ds)
    spacing = _pixel_spacing(ds.PixelSpacing, ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return _Frame(
        position=_vector(ds.ImagePositionPatient, 3, "ImagePositionPatient", ds),
        row_cosine=row,
        column_cosine=col,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixels=lambda: _rescaled(_decode(ds), slope, intercept),
        source=(_sop(ds), 1),
        temporal_key=_temporal_key(ds),
        kind=frame_facts(ds)[0].kind,
    )


def _mosaic_frames(ds: Dataset) -> list[_Frame]:
    """Unpack a Siemens mosaic into its slices with their true positions."""
    tiles = siemens_csa.mosaic_tile_count(ds)
    if not tiles:
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, f"mosaic {_named(ds)} without a tile count")
    mosaic = _classic_frame(ds)
    per_side = int(np.ceil(np.sqrt(tiles)))
    rows, columns = mosaic.rows // per_side, mosaic.columns // per_side
    # The mosaic's ImagePositionPatient is the corner of the whole mosaic as if it were one slice;
    # the real first slice is centred in it.
    shift_rows = (mosaic.rows - rows) / 2 * mosaic.pixel_spacing[0]
    shift_columns = (mosaic.columns - columns) / 2 * mosaic.pixel_spacing[1]
    first = mosaic.position + mosaic.column_cosine * shift_rows + mosaic.row_cosine * shift_columns
    normal = np.cross(mosaic.row_cosine, mosaic.column_cosine)
    csa_normal = siemens_csa.slice_normal_vector(ds)
    if csa_normal is not None and float(np.dot(csa_normal, normal)) < 0:
        normal = -normal
    step = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 0)
    if step <= 0:
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, f"mosaic {_named(ds)} without slice spacing")
    cache: dict[str, np.ndarray] = {}

    def tile(index: int) -> np.ndarray:
        if "all" not in cache:
            cache["all"] = mosaic.pixels()
        r, c = divmod(index, per_side)
        return cache["all"][r * rows : (r + 1) * rows, c * columns : (c + 1) * columns]

    return [
        _Frame(
            position=first + normal * step * index,
            row_cosine=mosaic.row_cosine,
            column_cosine=mosaic.column_cosine,
            pixel_spacing=mosaic.pixel_spacing,
            rows=rows,
            columns=columns,
            pixels=lambda index=index: tile(index),  # type: ignore[misc]
            source=(mosaic.source[0], 1),
            temporal_key=mosaic.temporal_key,
            kind=mosaic.kind,
        )
        for index in range(tiles)
    ]


def _enhanced_frames(ds: Dataset) -> list[_Frame]:
    frames = []
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    cache: dict[str, np.ndarray] = {}

    def frame_pixels(index: int, slope: float, intercept: float) -> np.ndarray:
        if "all" not in cache:
            decoded = _decode(ds)
            cache["all"] = decoded if decoded.ndim == 3 else decoded[np.newaxis]
        return _rescaled(cache["all"][index], slope, intercept)

    facts = frame_facts(ds)
    if len(facts) != n_frames:
        raise NotAVolumeError(
            VolumeErrorCause.MISSING_GEOMETRY,
            f"{_named(ds)} has {n_frames} frames but {len(facts)} per-frame functional groups",
        )
    for index in range(n_frames):
        position = functional_group(ds, index, "PlanePositionSequence")
        orientation = functional_group(ds, index, "PlaneOrientationSequence")
        measures = functional_group(ds, index, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None or "PixelSpacing" not in measures:
            raise NotAVolumeError(
                VolumeErrorCause.MISSING_GEOMETRY, f"frame {index + 1} of {_named(ds)} has no plane geometry"
            )
        row, col = _orientation(orientation.ImageOrientationPatient, ds)
        spacing = _pixel_spacing(measures.PixelSpacing, ds)
        transform = functional_group(ds, index, "PixelValueTransformationSequence")
        slope = float(transform.get("RescaleSlope", 1) or 1) if transform is not None else 1.0
        intercept = float(transform.get("RescaleIntercept", 0) or 0) if transform is not None else 0.0
        temporal = facts[index].temporal_position or 0.0
        frames.append(
            _Frame(
                position=_vector(position.ImagePositionPatient, 3, "ImagePositionPatient", ds),
                row_cosine=row,
                column_cosine=col,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                pixels=lambda index=index, s=slope, i=intercept: frame_pixels(index, s, i),  # type: ignore[misc]
                source=(_sop(ds), index + 1),
                temporal_key=(temporal, float(index)),
                kind=facts[index].kind,
            )
        )
    return frames


def _one_volume(frames: list[_Frame], pick: FramePick) -> list[_Frame]:
    """Keep one frame per position: the first time point of the one kind of image (or the picked kind)."""
    if len(_by_position(frames)) == len(frames):
        return frames
    if len({frame.kind for frame in frames}) > 1:
        frames = _picked(frames, pick)
    kinds = {frame.kind for frame in frames}
    if len(kinds) > 1:
        raise _mixed_kinds(kinds)
    groups = _by_position(frames)
    counts = {len(group) for group in groups}
    if counts == {1}:
        return frames
    if len(counts) > 1:
        raise NotAVolumeError(
            VolumeErrorCause.DUPLICATE_POSITIONS,
            f"positions repeat unevenly ({min(counts)} to {max(counts)} images per position)",
        )
    logger.info("4-D series (%d time points): using the first volume", counts.pop())
    return [min(group, key=lambda f: f.temporal_key) for group in groups]


def _by_position(frames: list[_Frame]) -> list[list[_Frame]]:
    by_position: dict[tuple[int, ...], list[_Frame]] = {}
    for frame in frames:
        key = tuple(round(float(v) / POSITION_TOLERANCE_MM) for v in frame.position)
        by_position.setdefault(key, []).append(frame)
    return list(by_position.values())


def _picked(frames: list[_Frame], pick: FramePick) -> list[_Frame]:
    """The frames of the kind ``pick`` chooses; criteria that tell nothing apart are ignored."""

    def narrowed(kept: list[_Frame]) -> list[_Frame]:
        return kept if 0 < len(kept) < len(frames) else frames

    if pick.image_type_any:
        wanted = {value.upper() for value in pick.image_type_any}
        frames = narrowed([f for f in frames if wanted & set(f.kind.image_type)])
    b_values = {f.kind.b_value for f in frames if f.kind.b_value is not None}
    if pick.min_b_value is not None and b_values and max(b_values) >= pick.min_b_value:
        frames = narrowed([f for f in frames if f.kind.b_value == max(b_values)])
    if pick.echo_time_ms is not None:
        echo = round(pick.echo_time_ms, 2)
        frames = narrowed([f for f in frames if f.kind.echo_time_ms == echo])
    return frames


def _mixed_kinds(kinds: set[FrameKind]) -> NotAVolumeError:
    """The refusal for several kinds of image at each position, naming what differs."""

    def listed(values: set[float | None], unit: str) -> str:
        return ", ".join("none" if v is None else f"{v:g}{unit}" for v in sorted(values, key=lambda v: (v is None, v)))

    image_types = {"\\".join(k.image_type) for k in kinds}
    echoes = {k.echo_time_ms for k in kinds}
    b_values = {k.b_value for k in kinds}
    if len(image_types) > 1:
        return NotAVolumeError(
            VolumeErrorCause.MIXED_IMAGE_TYPES,
            f"image types {', '.join(sorted(image_types))} at the same positions; the channel rule picks none",
        )
    if len(echoes) > 1:
        return NotAVolumeError(
            VolumeErrorCause.MULTIPLE_ECHOES,
            f"{len(echoes)} echoes (TE {listed(echoes, ' ms')}) at each position; the channel rule picks none",
        )
    return NotAVolumeError(
        VolumeErrorCause.MULTIPLE_B_VALUES,
        f"b-values {listed(b_values, '')} at each position; the channel rule picks none",
    )


def _assemble(frames: list[_Frame], first_ds: Dataset, *, allow_single_slice: bool) -> Volume:
    reference = frames[0]
    for frame in frames[1:]:
        if (
            np.abs(frame.row_cosine - reference.row_cosine).max() > _ORIENTATION_TOLERANCE
            or np.abs(frame.column_cosine - reference.column_cosine).max() > _ORIENTATION_TOLERANCE
        ):
            raise NotAVolumeError(VolumeErrorCause.MIXED_ORIENTATIONS, "image planes are not parallel")
        if (frame.rows, frame.columns) != (reference.rows, reference.columns) or not np.allclose(
            frame.pixel_spacing, reference.pixel_spacing, atol=1e-4
        ):
            raise NotAVolumeError(
                VolumeErrorCause.MIXED_SIZES,
                f"images of {reference.rows}x{reference.columns} @ {reference.pixel_spacing} mm and "
                f"{frame.rows}x{frame.columns} @ {frame.pixel_spacing} mm",
            )
    normal = np.cross(reference.row_cosine, reference.column_cosine)
    frames = sorted(frames, key=lambda f: float(f.position @ normal))
    in_plane = (
        reference.column_cosine * reference.pixel_spacing[0],
        reference.row_cosine * reference.pixel_spacing[1],
    )
    if len(frames) == 1:
        if not allow_single_slice:
            raise NotAVolumeError(VolumeErrorCause.SINGLE_SLICE, "one image where a 3-D volume is needed")
        thickness = float(first_ds.get("SliceThickness", 1.0) or 1.0)
        step = normal * thickness
    else:
        step = (frames[-1].position - frames[0].position) / (len(frames) - 1)
        spacing = float(np.linalg.norm(step))
        distances = np.array([float(f.position @ normal) for f in frames])
        gaps = np.diff(distances)
        tolerance = max(POSITION_TOLERANCE_MM, _RELATIVE_SPACING_TOLERANCE * spacing)
        if np.abs(gaps - gaps.mean()).max() > tolerance:
            raise NotAVolumeError(
                VolumeErrorCause.IRREGULAR_SPACING,
                f"slice gaps range from {gaps.min():.3f} to {gaps.max():.3f} mm (missing or extra slices?)",
            )
        # Every position must lie on the line first + k * step (catches in-plane jumps between slices).
        expected = frames[0].position + np.outer(np.arange(len(frames)), step)
        actual = np.array([f.position for f in frames])
        if np.abs(actual - expected).max() > tolerance:
            raise NotAVolumeError(VolumeErrorCause.IRREGULAR_SPACING, "slice positions are not collinear")
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = in_plane[0]
    affine[:3, 2] = in_plane[1]
    affine[:3, 3] = frames[0].position
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, "the voxel grid is degenerate (zero spacing)")
    array = np.stack([frame.pixels() for frame in frames])
    frame_of_reference = first_ds.get("FrameOfReferenceUID")
    return Volume(
        array=array,
        affine=affine,
        frame_of_reference_uid=str(frame_of_reference) if frame_of_reference else None,
        slice_sources=tuple(frame.source for frame in frames),
    )
