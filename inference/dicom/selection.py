"""Series selection: which series of a study feed which model channel, with the reason for every
series chosen or rejected (so an admin can see why a study failed or a wrong series was used)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from radfed.inference.dicom.frames import NON_IMAGE_MODALITIES, FrameFacts, float_or_none, frame_facts, is_enhanced
from radfed.inference.dicom.series import FramePick
from radfed.inference.errors import DicomInputError
from radfed.inference.model.taskspec import ChannelRule, TaskSpec
from radfed.inference.redaction import printable, uid_digest


@dataclass(frozen=True)
class SeriesInfo:
    """What selection needs to know of a series (from one image header plus the slice count).

    ``handle`` locates the series in its source: a folder path or an Orthanc series id. ``slices`` counts
    the slice positions of one volume (0: the series holds no image); ``non_image_instances`` says what
    each instance without an image is (a Raw Data object beside the images is skipped when loading).
    """

    series_instance_uid: str
    modality: str
    series_description: str
    series_number: int | None
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None
    slice_thickness_mm: float | None
    b_value: float | None
    slices: int
    handle: str
    non_image_instances: tuple[str, ...] = ()

    @classmethod
    def from_header(
        cls, ds: Dataset, slices: int, handle: str, *, non_image_instances: Sequence[str] = ()
    ) -> SeriesInfo:
        """Facts of the series whose image ``ds`` is (an enhanced image's from its functional groups)."""
        frames = frame_facts(ds) if is_enhanced(ds) else []
        first: FrameFacts | None = frames[0] if frames else None
        orientation = ds.get("ImageOrientationPatient")
        if first is not None:
            thickness = first.slice_thickness_mm
            b_values = [f.b_value for f in frames if f.b_value is not None]
            b_value = max(b_values) if b_values else float_or_none(ds.get("DiffusionBValue"))
            orientation = first.orientation
        else:
            thickness = float_or_none(ds.get("SliceThickness"))
            b_value = float_or_none(ds.get("DiffusionBValue"))
        return cls(
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            modality=str(ds.get("Modality", "")),
            series_description=str(ds.get("SeriesDescription", "")),
            series_number=_int_or_none(ds.get("SeriesNumber")),
            image_type=tuple(str(v).upper() for v in ds.get("ImageType", [])),
            orientation=_orientation_or_none(orientation),
            slice_thickness_mm=thickness,
            b_value=b_value,
            slices=slices,
            handle=handle,
            non_image_instances=tuple(non_image_instances),
        )


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _orientation_or_none(values: object) -> tuple[float, ...] | None:
    try:
        orientation = tuple(float(v) for v in values)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return orientation if len(orientation) == 6 else None


def frame_pick(rule: ChannelRule) -> FramePick:
    """What ``rule`` picks in a series that holds several kinds of image at each position."""
    return FramePick(image_type_any=rule.image_type_any, min_b_value=rule.min_b_value)


def _series_name(description: str, series_instance_uid: str) -> str:
    """How a job reason names a series: its description as printable ASCII (free text, shown in Orthanc
    Explorer), or the short hash of its UID."""
    return repr(printable(description)) if description else f"series {uid_digest(series_instance_uid)}"


@dataclass(frozen=True)
class SelectionDecision:
    series_instance_uid: str
    series_description: str
    channel: str | None  # the channel it was chosen for, or None
    reasons: tuple[str, ...]  # why it was chosen, or why each channel rejected it


@dataclass(frozen=True)
class SeriesSelection:
    chosen: dict[str, SeriesInfo]
    decisions: tuple[SelectionDecision, ...] = field(default=())

    def describe(self) -> list[str]:
        lines = []
        for d in self.decisions:
            verdict = f"-> {d.channel}" if d.channel else "rejected"
            lines.append(
                f"{_series_name(d.series_description, d.series_instance_uid)}: {verdict}: {'; '.join(d.reasons)}"
            )
        return lines


class NoMatchingSeriesError(DicomInputError):
    """A required channel matched no series of the study."""


def obliquity_deg(orientation: Sequence[float]) -> float:
    """Angle between the slice normal and the patient's head-foot axis (0 for a pure axial)."""
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm == 0:
        return 90.0
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])) / norm)))


def rule_verdict(rule: ChannelRule, series: SeriesInfo) -> tuple[bool, str]:
    """Whether ``series`` can feed ``rule``'s channel, and why (one sentence)."""
    if series.modality.upper() in NON_IMAGE_MODALITIES:
        return False, f"{series.modality} object, not an image series"
    if series.slices == 0 and series.non_image_instances:
        return False, f"no image among its instances ({_non_image_summary(series)})"
    if series.modality.upper() != rule.modality.upper():
        return False, f"modality {series.modality} is not {rule.modality}"
    description = series.series_description
    by_description = bool(rule.description_regex and re.search(rule.description_regex, description))
    by_image_type = bool(set(rule.image_type_any) & set(series.image_type))
    if (rule.description_regex or rule.image_type_any) and not (by_description or by_image_type):
        return False, f"description {description!r} does not match /{rule.description_regex}/" + (
            f" and ImageType {list(series.image_type)} has none of {list(rule.image_type_any)}"
            if rule.image_type_any
            else ""
        )
    if rule.exclude_regex and re.search(rule.exclude_regex, description):
        return False, f"description {description!r} matches the exclusion /{rule.exclude_regex}/"
    if series.orientation is not None:
        angle = obliquity_deg(series.orientation)
        if angle > rule.max_obliquity_deg:
            return False, f"slices {angle:.0f} deg from axial (at most {rule.max_obliquity_deg:.0f})"
    low, high = rule.slice_thickness_mm
    if series.slice_thickness_mm is not None and not low <= series.slice_thickness_mm <= high:
        return False, f"slice thickness {series.slice_thickness_mm:g} mm outside [{low:g}, {high:g}]"
    if series.slices < rule.min_slices:
        return False, f"{series.slices} slices (at least {rule.min_slices})"
    if rule.min_b_value is not None and series.b_value is not None and series.b_value < rule.min_b_value:
        return False, f"b-value {series.b_value:g} below {rule.min_b_value:g}"
    how = "description" if by_description else ("ImageType" if by_image_type else "modality")
    return True, f"matches by {how}"


def _non_image_summary(series: SeriesInfo) -> str:
    counts: dict[str, int] = {}
    for what in series.non_image_instances:
        counts[what] = counts.get(what, 0) + 1
    return ", ".join(what if n == 1 else f"{what} (x{n})" for what, n in sorted(counts.items()))


def select_series(spec: TaskSpec, series: Sequence[SeriesInfo]) -> SeriesSelection:
    """Assign one series to every channel of ``spec`` (each series to at most one channel).

    Among several candidates the highest SeriesNumber wins (a repeated acquisition replaces a
    degraded one), then the most slices. Raises :class:`NoMatchingSeriesError` naming the channel and
    why each series was rejected for it.
    """
    reasons: dict[str, list[str]] = {s.series_instance_uid: [] for s in series}
    for s in series:
        if s.non_image_instances and s.slices > 0:
            reasons[s.series_instance_uid].append(f"instances without an image skipped: {_non_image_summary(s)}")
    chosen: dict[str, SeriesInfo] = {}
    for rule in spec.channels:
        candidates = []
        for s in series:
            if any(c.series_instance_uid == s.series_instance_uid for c in chosen.values()):
                continue
            ok, why = rule_verdict(rule, s)
            if ok:
                candidates.append((s, why))
            else:
                reasons[s.series_instance_uid].append(f"not {rule.name}: {why}")
        if not candidates:
            detail = "; ".join(
                f"{_series_name(s.series_description, s.series_instance_uid)} ({rule_verdict(rule, s)[1]})"
                for s in series
            )
            raise NoMatchingSeriesError(f"no series matched rule {rule.name}: {detail or 'the study has no series'}")
        candidates.sort(key=lambda item: (item[0].series_number or 0, item[0].slices), reverse=True)
        best, why = candidates[0]
        chosen[rule.name] = best
        note = f"chosen for {rule.name}: {why}"
        if len(candidates) > 1:
            note += f" (over {len(candidates) - 1} other candidate(s): highest SeriesNumber, then most slices)"
        reasons[best.series_instance_uid].append(note)
    channel_of = {info.series_instance_uid: name for name, info in chosen.items()}
    decisions = tuple(
        SelectionDecision(
            s.series_instance_uid,
            s.series_description,
            channel_of.get(s.series_instance_uid),
            tuple(reasons[s.series_instance_uid]),
        )
        for s in series
    )
    return SeriesSelection(chosen, decisions)
