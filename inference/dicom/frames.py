"""What the instances and frames of a series are, read from headers alone (pixel data not needed).

Which instances hold an image at all (scanners put raw-data, spectroscopy and private objects into image
series), where each frame lies, and what sets apart frames at the same position: time point, echo, image
type or b-value. Enhanced multi-frame objects keep all of this in their functional groups (DICOM PS3.3
C.7.6.16, https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.7.6.16.html), classic
images at the top level of the dataset.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from pydicom.dataset import Dataset
from pydicom.uid import UID

# Objects that are not images of the patient, whatever pixels they carry.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "SR", "PR", "KO", "DOC", "REG", "OT_SR"})
# Storage SOP classes whose name lacks "Image Storage" but that hold images all the same.
_IMAGE_SOP_CLASS_NAMES = frozenset({"Parametric Map Storage"})
# Where enhanced objects put the frame's ImageType (PS3.3 C.8.13.5.1, C.8.15.3.1, C.8.22.5.1).
_FRAME_TYPE_SEQUENCES = ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence", "PETFrameTypeSequence")
# Slice positions may jitter by float rounding in the DICOM DS strings (16 characters): positions closer
# than this (mm) are one.
POSITION_TOLERANCE_MM = 1e-2


def non_image_sop_class(sop_class_uid: str) -> str | None:
    """The name of a storage SOP class that holds no image (``Raw Data Storage``...), else None.

    None also for SOP classes this pydicom does not know (private ones): only the header can tell.
    """
    name = UID(sop_class_uid).name if sop_class_uid else ""
    if not name.endswith("Storage") or "Image Storage" in name or name in _IMAGE_SOP_CLASS_NAMES:
        return None
    return name


def is_image_sop_class(sop_class_uid: str) -> bool:
    """Whether a storage SOP class is known to hold an image (False for unknown, private ones)."""
    name = UID(sop_class_uid).name if sop_class_uid else ""
    return "Image Storage" in name or name in _IMAGE_SOP_CLASS_NAMES


def non_image_reason(ds: Dataset) -> str | None:
    """What an instance is if not an image of the patient (``"Raw Data Storage object"``), else None.

    Works on headers read with ``stop_before_pixels``: an instance without Rows/Columns holds no image.
    """
    sop_class = non_image_sop_class(str(ds.get("SOPClassUID", "")))
    if sop_class is not None:
        return f"{sop_class} object"
    modality = str(ds.get("Modality", "")).upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"{modality} object"
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if ("Rows" not in ds or "Columns" not in ds) and not has_pixels:
        return "object without Rows, Columns or pixel data"
    return None


def functional_group(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` for one frame: from its per-frame group, else the shared group."""
    items: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        items.append(per_frame[frame_index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    for item in items:
        if sequence in item and len(item[sequence].value) > 0:
            found: Dataset = item[sequence].value[0]
            return found
    return None


class FrameKind(NamedTuple):
    """What an image at a slice position shows, apart from when it was taken."""

    image_type: tuple[str, ...]
    echo_time_ms: float | None
    b_value: float | None


@dataclass(frozen=True)
class FrameFacts:
    """One frame's place and kind, from the header.

    Frames at one position that differ in ``kind`` are different images (echoes, magnitude and phase,
    b-values); frames that differ only in ``temporal_position`` are time points of one image.
    """

    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    stack_id: str
    temporal_position: float | None
    image_type: tuple[str, ...]
    echo_time_ms: float | None
    b_value: float | None
    slice_thickness_mm: float | None

    @property
    def kind(self) -> FrameKind:
        # Rounded so that DS strings written with different precision still compare equal.
        echo = round(self.echo_time_ms, 2) if self.echo_time_ms is not None else None
        b_value = round(self.b_value, 1) if self.b_value is not None else None
        return FrameKind(self.image_type, echo, b_value)

    @property
    def position_key(self) -> tuple[int, ...] | None:
        if self.position is None:
            return None
        return tuple(round(v / POSITION_TOLERANCE_MM) for v in self.position)


def float_or_none(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _floats(values: object, n: int) -> tuple[float, ...] | None:
    try:
        found = tuple(float(v) for v in values)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return found if len(found) == n else None


def _upper(values: object) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        return (values.upper(),)
    return tuple(str(v).upper() for v in values)  # type: ignore[attr-defined]


def is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds


def frame_facts(ds: Dataset) -> list[FrameFacts]:
    """Facts of every frame of an image instance (one for a classic image, a mosaic included)."""
    if not is_enhanced(ds):
        position = _floats(ds.get("ImagePositionPatient"), 3)
        return [
            FrameFacts(
                position=position,  # type: ignore[arg-type]
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                stack_id="",
                temporal_position=float_or_none(ds.get("TemporalPositionIdentifier")),
                image_type=_upper(ds.get("ImageType")),
                echo_time_ms=float_or_none(ds.get("EchoTime")),
                b_value=float_or_none(ds.get("DiffusionBValue")),
                slice_thickness_mm=float_or_none(ds.get("SliceThickness")),
            )
        ]
    return [_enhanced_frame_facts(ds, index) for index in range(len(ds.PerFrameFunctionalGroupsSequence))]


def _enhanced_frame_facts(ds: Dataset, index: int) -> FrameFacts:
    position = functional_group(ds, index, "PlanePositionSequence")
    orientation = functional_group(ds, index, "PlaneOrientationSequence")
    measures = functional_group(ds, index, "PixelMeasuresSequence")
    content = functional_group(ds, index, "FrameContentSequence")
    echo = functional_group(ds, index, "MREchoSequence")
    diffusion = functional_group(ds, index, "MRDiffusionSequence")
    frame_type = next(
        (group for name in _FRAME_TYPE_SEQUENCES if (group := functional_group(ds, index, name)) is not None), None
    )
    thickness = measures.get("SliceThickness") if measures is not None else None
    return FrameFacts(
        position=_floats(position.get("ImagePositionPatient"), 3) if position is not None else None,  # type: ignore[arg-type]
        orientation=_floats(orientation.get("ImageOrientationPatient"), 6) if orientation is not None else None,
        stack_id=str(content.get("StackID", "")) if content is not None else "",
        temporal_position=float_or_none(content.get("TemporalPositionIndex")) if content is not None else None,
        image_type=_upper(frame_type.get("FrameType") if frame_type is not None else ds.get("ImageType")),
        echo_time_ms=float_or_none(echo.get("EffectiveEchoTime")) if echo is not None else None,
        b_value=float_or_none(diffusion.get("DiffusionBValue")) if diffusion is not None else None,
        slice_thickness_mm=float_or_none(thickness if thickness is not None else ds.get("SliceThickness")),
    )


def slices_per_volume(frames: Iterable[FrameFacts]) -> int:
    """Distinct slice positions of the largest stack: what one volume of the series holds.

    Time points, echoes and other images repeating a position count once; a frame without a position
    counts as a slice of its own.
    """
    per_stack: dict[str, set[object]] = {}
    for index, frame in enumerate(frames):
        key = frame.position_key
        per_stack.setdefault(frame.stack_id, set()).add(key if key is not None else ("no position", index))
    return max((len(keys) for keys in per_stack.values()), default=0)
