"""Output profile: what radfed writes, with defaults that every viewer in DICOM_OUTPUTS.md shows."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

_E = TypeVar("_E", bound=StrEnum)


class SegEncoding(StrEnum):
    BINARY = "BINARY"  # default: OHIF, Slicer, Weasis all draw it
    LABELMAP = "LABELMAP"  # smaller; recent viewers only; Orthanc 1.10 refuses it over C-STORE


class SrVariant(StrEnum):
    # Per lesion a volumetric group (SEG reference) and a planar group (outline on the key slice)
    # sharing one Tracking UID: OHIF draws it as one outline labelled with every measurement.
    VIEWER = "viewer"
    # Volumetric groups only: what 3D Slicer tabulates; crashes OHIF 3.13's SR viewport, never default.
    VOLUMETRIC_ONLY = "volumetric-only"


class StudyFindingPlacement(StrEnum):
    # The study-level probability and category in TID 1500's report-level "Qualitative Evaluations"
    # container (category as CODE, probability as TEXT). OHIF 3.13.2's SR viewport crashes ("Error
    # Boundary", blank viewport) on any measurement group without image coordinates, so the default
    # keeps every measurement group geometric.
    QUALITATIVE_EVALUATIONS = "qualitative-evaluations"
    # A TID 1501 measurement group with the probability as NUM: best for machine readers (dcmqi's
    # tid1500reader tabulates it), but it blanks OHIF 3.13.2's SR viewport. Never the default.
    MEASUREMENT_GROUP = "measurement-group"


def _choice(enum: type[_E], value: str | _E) -> _E:
    try:
        return enum(value)
    except ValueError:
        options = ", ".join(v.value for v in enum)
        raise ValueError(f"{value!r} is not one of {options}") from None


@dataclass(frozen=True)
class OutputProfile:
    """Settings of the result objects.

    Parameters
    ----------
    seg_encoding
        BINARY (default) or LABELMAP (RLE-compressed).
    sr_variant
        ``viewer`` (default) or ``volumetric-only``.
    study_finding
        ``qualitative-evaluations`` (default) or ``measurement-group``.
    key_images
        Also write one Secondary Capture per lesion with the outline burned in.
    max_frames_with_empty
        Keep empty frames (some viewers misplace segments with gaps) while frames x segments stays at
        or below this; above it, empty frames are omitted to bound size and browser memory.
    series_number_base
        Result series numbers: SEG = base, SR = base + 1, key images = base + 2.
    """

    seg_encoding: SegEncoding = SegEncoding.BINARY
    sr_variant: SrVariant = SrVariant.VIEWER
    study_finding: StudyFindingPlacement = StudyFindingPlacement.QUALITATIVE_EVALUATIONS
    key_images: bool = False
    max_frames_with_empty: int = 2000
    series_number_base: int = 9500

    def __post_init__(self) -> None:
        object.__setattr__(self, "seg_encoding", _choice(SegEncoding, self.seg_encoding))
        object.__setattr__(self, "sr_variant", _choice(SrVariant, self.sr_variant))
        object.__setattr__(self, "study_finding", _choice(StudyFindingPlacement, self.study_finding))
