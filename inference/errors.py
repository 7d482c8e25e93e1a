"""The radfed error tree.

Every operational failure raised by radfed derives from :class:`RadfedError` and from the builtin that
matches its nature, so callers outside radfed can still catch ``ValueError`` or ``ConnectionError``.
Each boundary (CLI ``main``, HTTP handlers, Orthanc callbacks) translates these exactly once.
"""

from __future__ import annotations

from enum import StrEnum


class RadfedError(Exception):
    """Base of every operational failure radfed reports."""


class DicomInputError(RadfedError, ValueError):
    """A DICOM object or series cannot be used as given (the input is at fault, not radfed)."""


class VolumeErrorCause(StrEnum):
    """Why a set of DICOM instances cannot become one volume."""

    EMPTY = "empty"
    NOT_AN_IMAGE = "not-an-image"
    NO_PIXEL_DATA = "no-pixel-data"
    UNDECODABLE_PIXELS = "undecodable-pixels"
    MULTIPLE_SERIES = "multiple-series"
    MISSING_GEOMETRY = "missing-geometry"
    MIXED_ORIENTATIONS = "mixed-orientations"
    MIXED_SIZES = "mixed-sizes"
    LOCALIZER = "localizer"
    SINGLE_SLICE = "single-slice"
    DUPLICATE_POSITIONS = "duplicate-positions"
    IRREGULAR_SPACING = "irregular-spacing"
    NOT_GRAYSCALE = "not-grayscale"
    MULTIPLE_ECHOES = "multiple-echoes"
    MIXED_IMAGE_TYPES = "mixed-image-types"
    MULTIPLE_B_VALUES = "multiple-b-values"


class NotAVolumeError(DicomInputError):
    """The instances cannot be placed on one regular 3-D grid; ``cause`` says why."""

    def __init__(self, cause: VolumeErrorCause, detail: str) -> None:
        super().__init__(f"{cause.value}: {detail}")
        self.cause = cause
        self.detail = detail


class SegmentationReadError(DicomInputError):
    """A reference segmentation cannot be placed on the requested grid."""


class OrthancError(RadfedError):
    """Base of the failures talking to an Orthanc server."""


class OrthancUnavailableError(OrthancError, ConnectionError):
    """Orthanc does not answer (down, restarting, wrong address)."""


class OrthancRequestError(OrthancError, RuntimeError):
    """Orthanc answered with an error status."""

    def __init__(self, method: str, path: str, status: int, detail: str) -> None:
        super().__init__(f"Orthanc {method} {path} -> HTTP {status}: {detail}")
        self.status = status


class OrthancLaunchError(OrthancError, RuntimeError):
    """A local Orthanc process could not be started."""


class ResultQualityError(RadfedError, RuntimeError):
    """A result object failed radfed's own quality checks (e.g. SEG geometry); nothing was stored."""
