"""DICOM series -> :class:`~radfed.inference.volume.Volume` with an exact affine.

Handles single-frame images, enhanced multi-frame MR/CT (per-frame functional groups), Siemens mosaics,
4-D series (the first volume is returned) and every transfer syntax pydicom's pixel handlers decode.
What cannot be one regular 3-D grid raises :class:`NotAVolumeError` naming the cause.
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

from radfed.inference import siemens_csa
from radfed.inference.errors import DicomInputError, NotAVolumeError, VolumeErrorCause
from radfed.inference.volume import Volume

logger = logging.getLogger(__name__)

# Direction cosines of real scanners agree to ~1e-6; 1e-4 still separates a 0.006 degree tilt.
_ORIENTATION_TOLERANCE = 1e-4
# Slice positions may jitter by float rounding in the DICOM DS strings (16 characters).
_POSITION_TOLERANCE_MM = 1e-2
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


def read_series_files(paths: Iterable[Path]) -> list[Dataset]:
    """Read DICOM files (skipping nothing silently: a non-DICOM file raises)."""
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError) as exc:
            raise DicomInputError(f"{path.name}: not a readable DICOM file ({exc})") from exc
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


def volume_from_datasets(datasets: Sequence[Dataset], *, allow_single_slice: bool = False) -> Volume:
    """Assemble the instances of one series into a volume.

    Parameters
    ----------
    datasets
        All instances of one series, in any order.
    allow_single_slice
        Accept a single plane (a volume of one slice whose thickness is SliceThickness).
    """
    if not datasets:
        raise NotAVolumeError(VolumeErrorCause.EMPTY, "no instances")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) > 1:
        raise NotAVolumeError(VolumeErrorCause.MULTIPLE_SERIES, f"{len(series_uids)} series mixed")
    frames = [frame for ds in datasets for frame in _frames_of(ds)]
    frames = _first_volume(frames)
    return _assemble(frames, datasets[0], allow_single_slice=allow_single_slice)


# Objects that carry pixels but are not images of the patient.
_NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTDOSE", "SR", "PR", "KO", "DOC", "REG"})


def _frames_of(ds: Dataset) -> list[_Frame]:
    modality = str(ds.get("Modality", "")).upper()
    if modality in _NON_IMAGE_MODALITIES:
        raise NotAVolumeError(
            VolumeErrorCause.NOT_AN_IMAGE, f"instance {_sop(ds)} is a {modality} object, not an image series"
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        kind = "an image" if "Rows" in ds else "not an image (no Rows/Columns)"
        cause = VolumeErrorCause.NO_PIXEL_DATA if "Rows" in ds else VolumeErrorCause.NOT_AN_IMAGE
        raise NotAVolumeError(cause, f"instance {_sop(ds)} is {kind} without pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise NotAVolumeError(
            VolumeErrorCause.NOT_GRAYSCALE,
            f"instance {_sop(ds)} has {ds.SamplesPerPixel} samples per pixel "
            f"({ds.get('PhotometricInterpretation', '?')})",
        )
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        raise NotAVolumeError(VolumeErrorCause.LOCALIZER, f"instance {_sop(ds)} is a localizer")
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise NotAVolumeError(
            VolumeErrorCause.MISSING_GEOMETRY,
            f"instance {_sop(ds)} has {ds.NumberOfFrames} frames but no per-frame geometry",
        )
    if "MOSAIC" in image_type:
        return _mosaic_frames(ds)
    return [_classic_frame(ds)]


def _sop(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "?"))


def _vector(values: object, n: int, what: str, ds: Dataset) -> np.ndarray:
    try:
        vec = np.array([float(v) for v in values], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, f"{what} unreadable in {_sop(ds)}") from exc
    if vec.shape != (n,) or not np.all(np.isfinite(vec)):
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, f"{what} malformed in {_sop(ds)}")
    return vec


def _orientation(values: object, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    iop = _vector(values, 6, "ImageOrientationPatient", ds)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise NotAVolumeError(
            VolumeErrorCause.MISSING_GEOMETRY, f"ImageOrientationPatient not orthonormal in {_sop(ds)}"
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
        raise NotAVolumeError(
            VolumeErrorCause.UNDECODABLE_PIXELS, f"instance {_sop(ds)}: {type(exc).__name__}: {exc}"
        ) from exc


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
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, f"{', '.join(missing)} missing in {_sop(ds)}")
    row, col = _orientation(ds.ImageOrientationPatient, ds)
    spacing = _vector(ds.PixelSpacing, 2, "PixelSpacing", ds)
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
    )


def _mosaic_frames(ds: Dataset) -> list[_Frame]:
    """Unpack a Siemens mosaic into its slices with their true positions."""
    tiles = siemens_csa.mosaic_tile_count(ds)
    if not tiles:
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, f"mosaic {_sop(ds)} without a tile count")
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
        raise NotAVolumeError(VolumeErrorCause.MISSING_GEOMETRY, f"mosaic {_sop(ds)} without slice spacing")
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
        )
        for index in range(tiles)
    ]


def _functional_group(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    for groups in (
        ds.PerFrameFunctionalGroupsSequence[frame_index],
        ds.get("SharedFunctionalGroupsSequence"),
    ):
        if groups is None:
            continue
        item = groups[0] if isinstance(groups, pydicom.Sequence) else groups
        if sequence in item and len(item[sequence].value) > 0:
            found: Dataset = item[sequence].value[0]
            return found
    return None


def _enhanced_frames(ds: Dataset) -> list[_Frame]:
    frames = []
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    cache: dict[str, np.ndarray] = {}

    def frame_pixels(index: int, slope: float, intercept: float) -> np.ndarray:
        if "all" not in cache:
            decoded = _decode(ds)
            cache["all"] = decoded if decoded.ndim == 3 else decoded[np.newaxis]
        return _rescaled(cache["all"][index], slope, intercept)

    for index in range(n_frames):
        position = _functional_group(ds, index, "PlanePositionSequence")
        orientation = _functional_group(ds, index, "PlaneOrientationSequence")
        measures = _functional_group(ds, index, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None or "PixelSpacing" not in measures:
            raise NotAVolumeError(
                VolumeErrorCause.MISSING_GEOMETRY, f"frame {index + 1} of {_sop(ds)} has no plane geometry"
            )
        row, col = _orientation(orientation.ImageOrientationPatient, ds)
        spacing = _vector(measures.PixelSpacing, 2, "PixelSpacing", ds)
        transform = _functional_group(ds, index, "PixelValueTransformationSequence")
        slope = float(transform.get("RescaleSlope", 1) or 1) if transform is not None else 1.0
        intercept = float(transform.get("RescaleIntercept", 0) or 0) if transform is not None else 0.0
        content = _functional_group(ds, index, "FrameContentSequence")
        temporal = float(content.get("TemporalPositionIndex", 0) or 0) if content is not None else 0.0
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
            )
        )
    return frames


def _first_volume(frames: list[_Frame]) -> list[_Frame]:
    """Keep one frame per position; for a 4-D series, the first in time."""
    by_position: dict[tuple[int, ...], list[_Frame]] = {}
    for frame in frames:
        key = tuple(round(float(v) / _POSITION_TOLERANCE_MM) for v in frame.position)
        by_position.setdefault(key, []).append(frame)
    counts = {len(group) for group in by_position.values()}
    if counts == {1}:
        return frames
    if len(counts) > 1:
        raise NotAVolumeError(
            VolumeErrorCause.DUPLICATE_POSITIONS,
            f"positions repeat unevenly ({min(counts)} to {max(counts)} images per position)",
        )
    logger.info("4-D series (%d time points): using the first volume", counts.pop())
    return [min(group, key=lambda f: f.temporal_key) for group in by_position.values()]


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
        tolerance = max(_POSITION_TOLERANCE_MM, _RELATIVE_SPACING_TOLERANCE * spacing)
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
    array = np.stack([frame.pixels() for frame in frames])
    frame_of_reference = first_ds.get("FrameOfReferenceUID")
    return Volume(
        array=array,
        affine=affine,
        frame_of_reference_uid=str(frame_of_reference) if frame_of_reference else None,
        slice_sources=tuple(frame.source for frame in frames),
    )
