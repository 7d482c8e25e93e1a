"""One vocabulary for why a job failed, shared by the ledger, ``/metrics`` (label ``failure_kind``), the API
and Orthanc Explorer's status box. A kind may carry one detail after a colon (``bad-input:missing-geometry``,
``orthanc-http:409``); metrics use the kind alone."""

from __future__ import annotations

from enum import StrEnum

from radfed.inference.dicom.selection import NoMatchingSeriesError
from radfed.inference.errors import (
    DicomInputError,
    OrthancRequestError,
    OrthancUnavailableError,
    RadfedError,
    ResultQualityError,
)


class FailureKind(StrEnum):
    NO_MATCHING_SERIES = "no-matching-series"  # the study has no series the task's channel rules accept
    BAD_INPUT = "bad-input"  # a chosen series cannot be read as a volume (detail: the cause)
    UNEXAMINABLE = "unexaminable"  # the study's headers broke series selection itself
    RESULT_QA = "result-qa"  # the SEG / SR built failed radfed's own checks
    ORTHANC_UNAVAILABLE = "orthanc-unavailable"  # Orthanc did not answer through every retry
    ORTHANC_HTTP = "orthanc-http"  # Orthanc refused a request (detail: the status)
    RADFED = "radfed"  # another radfed error (detail: its class)
    INTERNAL = "internal"  # a bug: the log has the traceback

    @classmethod
    def of(cls, error: BaseException, *, examining: bool = False) -> FailureKind:
        """The kind of an exception raised while examining a study or running its job."""
        if isinstance(error, NoMatchingSeriesError):
            return cls.NO_MATCHING_SERIES
        if isinstance(error, DicomInputError):
            return cls.BAD_INPUT
        if examining:
            return cls.UNEXAMINABLE
        if isinstance(error, ResultQualityError):
            return cls.RESULT_QA
        if isinstance(error, OrthancUnavailableError):
            return cls.ORTHANC_UNAVAILABLE
        if isinstance(error, OrthancRequestError):
            return cls.ORTHANC_HTTP
        if isinstance(error, RadfedError):
            return cls.RADFED
        return cls.INTERNAL

    def with_detail(self, detail: object) -> str:
        return f"{self.value}:{detail}" if detail not in (None, "") else self.value


def failure_label(error: BaseException, *, examining: bool = False) -> str:
    """The ledger's ``failure_kind`` for an exception: its kind, and the detail where the kind has one."""
    kind = FailureKind.of(error, examining=examining)
    if kind is FailureKind.BAD_INPUT:
        return kind.with_detail(getattr(error, "cause", None))
    if kind is FailureKind.ORTHANC_HTTP:
        return kind.with_detail(getattr(error, "status", None))
    if kind is FailureKind.RADFED:
        return kind.with_detail(type(error).__name__)
    return kind.value
