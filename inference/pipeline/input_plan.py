"""One decision per study: which instances of which series feed which channel, why, and their fingerprint.

The node plans a study once, from headers (:func:`plan_inputs`), stores the plan with the job and the pipeline
loads exactly the planned instances (:func:`radfed.inference.pipeline.preprocess.load_study`); nothing re-selects series
or re-reads headers on the way. The fingerprint is the same function of the planned SOP Instance UIDs that keys
the job and the result UIDs (:func:`radfed.inference.pipeline.findings.input_fingerprint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from radfed.inference.dicom.frames import NON_IMAGE_MODALITIES
from radfed.inference.dicom.selection import SelectionDecision, SeriesInfo, SeriesSelection, select_series
from radfed.inference.dicom.study_source import StudySource
from radfed.inference.model.taskspec import TaskSpec
from radfed.inference.pipeline.findings import input_fingerprint

PLAN_FORMAT = 1  # bumped when the stored form changes; an older stored plan is planned again


@dataclass(frozen=True)
class SeriesInstances:
    """A series as the planner sees it: its header facts and its kept instances, in load order."""

    info: SeriesInfo
    locations: tuple[str, ...]  # file paths or Orthanc instance ids
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class PlannedChannel:
    channel: str
    series: SeriesInfo
    locations: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class InputPlan:
    """The channels' series and instances, every series' verdict, and the input fingerprint."""

    study_instance_uid: str
    channels: tuple[PlannedChannel, ...]
    decisions: tuple[SelectionDecision, ...]
    fingerprint: str

    @property
    def selection(self) -> SeriesSelection:
        return SeriesSelection({c.channel: c.series for c in self.channels}, self.decisions)

    def describe(self) -> list[str]:
        """One line per series: the channel it feeds or why it was rejected (shown with the job)."""
        return self.selection.describe()

    def channel(self, name: str) -> PlannedChannel:
        for planned in self.channels:
            if planned.channel == name:
                return planned
        raise KeyError(f"the plan has no channel {name!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (the ledger stores it with the job)."""
        return {"format": PLAN_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InputPlan | None:
        """The plan stored by :meth:`to_json`, or None for an empty or older stored form."""
        if not data or data.get("format") != PLAN_FORMAT:
            return None
        channels = tuple(
            PlannedChannel(
                str(c["channel"]),
                _series_info(c["series"]),
                tuple(c["locations"]),
                tuple(c["sop_instance_uids"]),
            )
            for c in data["channels"]
        )
        decisions = tuple(
            SelectionDecision(d["series_instance_uid"], d["series_description"], d["channel"], tuple(d["reasons"]))
            for d in data["decisions"]
        )
        return cls(str(data["study_instance_uid"]), channels, decisions, str(data["fingerprint"]))


def _series_info(data: Mapping[str, Any]) -> SeriesInfo:
    tuples = {"image_type", "orientation", "non_image_instances"}
    fields: dict[str, Any] = {k: (tuple(v) if k in tuples and v is not None else v) for k, v in data.items()}
    return SeriesInfo(**fields)


def plan_inputs(study_instance_uid: str, series: Sequence[SeriesInstances], spec: TaskSpec) -> InputPlan:
    """Select the spec's channels among ``series`` (:func:`select_series`, with its reasons) and fingerprint
    the chosen instances. Raises :class:`~radfed.inference.dicom.selection.NoMatchingSeriesError` like it."""
    selection = select_series(spec, [s.info for s in series])
    by_uid = {s.info.series_instance_uid: s for s in series}
    chosen = {name: by_uid[info.series_instance_uid] for name, info in selection.chosen.items()}
    channels = tuple(
        PlannedChannel(name, found.info, found.locations, found.sop_instance_uids) for name, found in chosen.items()
    )
    fingerprint = input_fingerprint(uid for planned in channels for uid in planned.sop_instance_uids)
    return InputPlan(study_instance_uid, channels, selection.decisions, fingerprint)


def image_fingerprint(series: Sequence[SeriesInstances]) -> str:
    """The fingerprint of every image instance of a study: the key of a study that cannot be planned, so that the
    same content fails once and a new instance gets a new try."""
    return input_fingerprint(
        uid for s in series if s.info.modality.upper() not in NON_IMAGE_MODALITIES for uid in s.sop_instance_uids
    )


def study_series(source: StudySource) -> list[SeriesInstances]:
    """Every series of ``source`` with its kept instances (headers only: no pixel data is read)."""
    found = []
    for info in source.series():
        kept = source.instances(info)
        found.append(SeriesInstances(info, tuple(loc for loc, _ in kept), tuple(uid for _, uid in kept)))
    return found


def plan_study(source: StudySource, spec: TaskSpec) -> InputPlan:
    """:func:`plan_inputs` for a study source's headers."""
    return plan_inputs(source.study_instance_uid, study_series(source), spec)
