"""Where a study's instances come from: a folder of files or an Orthanc server, behind one interface.

Both sources skip the instances that hold no image in a series that has images (a Philips Raw Data object
beside its Enhanced MR image): they are named in :attr:`SeriesInfo.non_image_instances`, left out of the
SOP Instance UIDs and not downloaded. A series without any image (a SEG) is read whole.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from radfed.inference.dicom import siemens_csa
from radfed.inference.dicom.frames import (
    FrameFacts,
    float_or_none,
    frame_facts,
    is_image_sop_class,
    non_image_reason,
    non_image_sop_class,
    slices_per_volume,
)
from radfed.inference.dicom.selection import SeriesInfo
from radfed.inference.errors import DicomInputError
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.redaction import uid_digest

SEG_MODALITY = "SEG"


class StudySource(Protocol):
    """A study's series, their instances, and its segmentations."""

    @property
    def study_instance_uid(self) -> str: ...

    @property
    def accession_number(self) -> str: ...

    def series(self) -> list[SeriesInfo]: ...

    def sop_instance_uids(self, series: SeriesInfo) -> list[str]: ...

    def datasets(self, series: SeriesInfo) -> list[Dataset]: ...

    def instances(self, series: SeriesInfo) -> list[tuple[str, str]]:
        """The kept instances as (location, SOP Instance UID): what a plan records and loads again."""
        ...

    def datasets_at(self, locations: Sequence[str]) -> list[Dataset]:
        """The instances at these locations (file paths, Orthanc instance ids), in that order."""
        ...


@dataclass
class _SeriesContent:
    """The instances of one series (by file path or Orthanc id), images apart from the rest."""

    header: Dataset | None = None  # of the first image; of the first instance while no image is seen
    image_header: bool = False
    images: list[tuple[str, str]] = field(default_factory=list)  # (location, SOP Instance UID)
    others: list[tuple[str, str, str]] = field(default_factory=list)  # (location, SOP Instance UID, what)
    frames: list[FrameFacts] = field(default_factory=list)

    def add_image(self, location: str, sop_instance_uid: str, frames: Sequence[FrameFacts]) -> None:
        self.images.append((location, sop_instance_uid))
        self.frames.extend(frames)

    def add_other(self, location: str, sop_instance_uid: str, what: str) -> None:
        self.others.append((location, sop_instance_uid, what))

    @property
    def kept(self) -> list[tuple[str, str]]:
        """The images; every instance of a series without any (a SEG series is read as it is)."""
        return self.images or [(location, uid) for location, uid, _ in self.others]

    def info(self, handle: str) -> SeriesInfo:
        if self.header is None:
            raise DicomInputError(f"series {_series_label(handle)} has no instances")
        slices = _slices(self.header, self.frames) if self.images else 0
        non_images = tuple(what for _, _, what in self.others)
        return SeriesInfo.from_header(self.header, slices, handle, non_image_instances=non_images)


def _series_label(handle: str) -> str:
    """A series as messages name it: its Orthanc id, or a short hash where the handle is its UID (a folder)."""
    return uid_digest(handle) if handle.replace(".", "").isdigit() else handle


def _slices(header: Dataset, frames: list[FrameFacts]) -> int:
    """Slice positions of one volume (a Siemens mosaic holds a whole volume in each instance)."""
    if "MOSAIC" in [str(v).upper() for v in header.get("ImageType", [])]:
        tiles = siemens_csa.mosaic_tile_count(header)
        if tiles:
            return tiles
    return slices_per_volume(frames)


class FolderStudy:
    """Every DICOM file under a folder (any depth), grouped by series; one study expected."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._series: dict[str, _SeriesContent] = {}
        studies = set()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError):
                continue  # not DICOM (truth.json, README, ...)
            studies.add(str(header.get("StudyInstanceUID", "")))
            content = self._series.setdefault(str(header.get("SeriesInstanceUID", "")), _SeriesContent())
            sop_uid = str(header.get("SOPInstanceUID", ""))
            reason = non_image_reason(header)
            if reason is not None:
                content.add_other(str(path), sop_uid, reason)
                if content.header is None:
                    content.header = header
                continue
            if not content.image_header:
                content.header, content.image_header = header, True
            content.add_image(str(path), sop_uid, frame_facts(header))
        if not self._series:
            raise DicomInputError(f"no DICOM files under {folder}")
        if len(studies) != 1:
            raise DicomInputError(f"{folder} holds {len(studies)} studies; one study per folder is expected")
        self._study_uid = studies.pop()

    @property
    def study_instance_uid(self) -> str:
        return self._study_uid

    @property
    def accession_number(self) -> str:
        header = next(iter(self._series.values())).header
        return str(header.get("AccessionNumber", "")) if header is not None else ""

    def series(self) -> list[SeriesInfo]:
        return [content.info(uid) for uid, content in self._series.items()]

    def sop_instance_uids(self, series: SeriesInfo) -> list[str]:
        return [uid for _, uid in self._series[series.handle].kept]

    def datasets(self, series: SeriesInfo) -> list[Dataset]:
        return self.datasets_at([path for path, _ in self._series[series.handle].kept])

    def instances(self, series: SeriesInfo) -> list[tuple[str, str]]:
        return list(self._series[series.handle].kept)

    def datasets_at(self, locations: Sequence[str]) -> list[Dataset]:
        return [pydicom.dcmread(path) for path in locations]


class OrthancStudy:
    """A study stored in Orthanc (by Orthanc study id)."""

    def __init__(self, client: OrthancClient, study_id: str) -> None:
        self.client = client
        self.study_id = study_id
        self._study = client.study(study_id)
        self._contents: dict[str, _SeriesContent] = {}

    @property
    def study_instance_uid(self) -> str:
        return str(self._study["MainDicomTags"]["StudyInstanceUID"])

    @property
    def accession_number(self) -> str:
        return str(self._study["MainDicomTags"].get("AccessionNumber", ""))

    @property
    def series_ids(self) -> list[str]:
        return [str(series_id) for series_id in self._study["Series"]]

    def _header(self, instance_id: str) -> Dataset:
        """The instance's tags from Orthanc (no pixels); the file only where a binary element decides (a mosaic
        whose tile count is in the CSA header alone)."""
        header = self.client.instance_header(instance_id)
        mosaic = "MOSAIC" in [str(v).upper() for v in header.get("ImageType", [])]
        if mosaic and siemens_csa.mosaic_tile_count(header) is None:
            header = pydicom.dcmread(io.BytesIO(self.client.instance_bytes(instance_id)), stop_before_pixels=True)
        return header

    def _content(self, series_id: str) -> _SeriesContent:
        """Sort a series' instances into images and the rest, downloading as few as possible.

        Classic images carry ImagePositionPatient among Orthanc's main tags; the other instances are
        judged by the SOP class Orthanc records, and only multi-frame or unknown ones are downloaded.
        """
        if series_id in self._contents:
            return self._contents[series_id]
        content = _SeriesContent()
        instances: list[dict[str, Any]] = self.client.get_json(f"/series/{series_id}/instances")
        for instance in instances:
            instance_id = str(instance["ID"])
            tags: dict[str, str] = instance.get("MainDicomTags", {})
            sop_uid = str(tags.get("SOPInstanceUID", ""))
            position = _backslash_floats(tags.get("ImagePositionPatient"), 3)
            if position is not None:
                content.add_image(instance_id, sop_uid, [_classic_facts(position, tags)])
                continue
            metadata: dict[str, str] = self.client.get_json(f"/instances/{instance_id}/metadata?expand")
            sop_class = str(metadata.get("SopClassUid", ""))
            skipped_class = non_image_sop_class(sop_class)
            if skipped_class is not None:
                content.add_other(instance_id, sop_uid, f"{skipped_class} object")
                continue
            if is_image_sop_class(sop_class) and (float_or_none(tags.get("NumberOfFrames")) or 1) <= 1:
                content.add_image(instance_id, sop_uid, [_classic_facts(None, tags)])
                continue
            header = self._header(instance_id)
            reason = non_image_reason(header)
            if reason is not None:
                content.add_other(instance_id, sop_uid, reason)
                if content.header is None:
                    content.header = header
                continue
            if not content.image_header:
                content.header, content.image_header = header, True
            content.add_image(instance_id, sop_uid, frame_facts(header))
        if content.images and not content.image_header:
            content.header, content.image_header = self._header(content.images[0][0]), True
        elif content.header is None and content.others:
            content.header = self._header(content.others[0][0])
        self._contents[series_id] = content
        return content

    def series(self) -> list[SeriesInfo]:
        infos = []
        for series_id in self._study["Series"]:
            content = self._content(str(series_id))
            if content.header is not None:
                infos.append(content.info(str(series_id)))
        return infos

    def sop_instance_uids(self, series: SeriesInfo) -> list[str]:
        return [uid for _, uid in self._content(series.handle).kept]

    def datasets(self, series: SeriesInfo) -> list[Dataset]:
        return self.datasets_at([instance_id for instance_id, _ in self._content(series.handle).kept])

    def instances(self, series: SeriesInfo) -> list[tuple[str, str]]:
        return list(self._content(series.handle).kept)

    def datasets_at(self, locations: Sequence[str]) -> list[Dataset]:
        return self.client.instance_datasets(locations)


def _backslash_floats(value: str | None, n: int) -> tuple[float, ...] | None:
    """Orthanc's main tags hold multi-valued DS as ``a\\b\\c``."""
    try:
        found = tuple(float(v) for v in value.split("\\")) if value else ()
    except ValueError:
        return None
    return found if len(found) == n else None


def _classic_facts(position: tuple[float, ...] | None, tags: dict[str, str]) -> FrameFacts:
    """Where a single-frame image lies, from Orthanc's main tags (its kind is read on download)."""
    return FrameFacts(
        position=position,  # type: ignore[arg-type]
        orientation=_backslash_floats(tags.get("ImageOrientationPatient"), 6),
        stack_id="",
        temporal_position=None,
        image_type=(),
        echo_time_ms=None,
        b_value=None,
        slice_thickness_mm=None,
    )
