"""Where a study's instances come from: a folder of files or an Orthanc server, behind one interface."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from radfed.inference.errors import DicomInputError
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.selection import SeriesInfo

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


class FolderStudy:
    """Every DICOM file under a folder (any depth), grouped by series; one study expected."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[str, list[Path]] = defaultdict(list)
        self._headers: dict[str, Dataset] = {}
        self._sops: dict[str, list[str]] = defaultdict(list)
        studies = set()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError):
                continue  # not DICOM (truth.json, README, ...)
            uid = str(header.get("SeriesInstanceUID", ""))
            studies.add(str(header.get("StudyInstanceUID", "")))
            self._files[uid].append(path)
            self._sops[uid].append(str(header.SOPInstanceUID))
            self._headers.setdefault(uid, header)
        if not self._files:
            raise DicomInputError(f"no DICOM files under {folder}")
        if len(studies) != 1:
            raise DicomInputError(f"{folder} holds {len(studies)} studies; one study per folder is expected")
        self._study_uid = studies.pop()

    @property
    def study_instance_uid(self) -> str:
        return self._study_uid

    @property
    def accession_number(self) -> str:
        return str(next(iter(self._headers.values())).get("AccessionNumber", ""))

    def series(self) -> list[SeriesInfo]:
        return [
            SeriesInfo.from_header(header, _slices(header, len(self._files[uid])), uid)
            for uid, header in self._headers.items()
        ]

    def sop_instance_uids(self, series: SeriesInfo) -> list[str]:
        return list(self._sops[series.handle])

    def datasets(self, series: SeriesInfo) -> list[Dataset]:
        return [pydicom.dcmread(path) for path in self._files[series.handle]]


def _slices(header: Dataset, instances: int) -> int:
    frames = int(header.get("NumberOfFrames", 1) or 1)
    return max(instances, frames) if instances == 1 else instances


class OrthancStudy:
    """A study stored in Orthanc (by Orthanc study id)."""

    def __init__(self, client: OrthancClient, study_id: str) -> None:
        self.client = client
        self.study_id = study_id
        self._study = client.study(study_id)
        self._instances: dict[str, list[dict[str, object]]] = {}

    @property
    def study_instance_uid(self) -> str:
        return str(self._study["MainDicomTags"]["StudyInstanceUID"])

    @property
    def accession_number(self) -> str:
        return str(self._study["MainDicomTags"].get("AccessionNumber", ""))

    @property
    def series_ids(self) -> list[str]:
        return [str(series_id) for series_id in self._study["Series"]]

    def _series_instances(self, series_id: str) -> list[dict[str, object]]:
        if series_id not in self._instances:
            self._instances[series_id] = self.client.get_json(f"/series/{series_id}/instances")
        return self._instances[series_id]

    def series(self) -> list[SeriesInfo]:
        infos = []
        for series_id in self._study["Series"]:
            instances = self._series_instances(series_id)
            if not instances:
                continue
            header = pydicom.dcmread(
                io.BytesIO(self.client.instance_bytes(str(instances[0]["ID"]))), stop_before_pixels=True
            )
            infos.append(SeriesInfo.from_header(header, _slices(header, len(instances)), series_id))
        return infos

    def sop_instance_uids(self, series: SeriesInfo) -> list[str]:
        return [str(i["MainDicomTags"]["SOPInstanceUID"]) for i in self._series_instances(series.handle)]  # type: ignore[index]

    def datasets(self, series: SeriesInfo) -> list[Dataset]:
        return self.client.instance_datasets([str(i["ID"]) for i in self._series_instances(series.handle)])
