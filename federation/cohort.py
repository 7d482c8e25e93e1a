"""A site's training cohort, built with the task spec from studies it already holds (folders written by
``radfed synth`` or an Orthanc server): image channels, the radiologist's reference SEG and the class
label, preprocessed exactly as inference does and cached between rounds. Bad studies are skipped and
reported with a reason, never fatal."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from radfed.inference.errors import RadfedError
from radfed.inference.orthanc.client import OrthancClient, OrthancEndpoint
from radfed.inference.preprocess import labels_to_model_grid, landmarks_of, load_study, prepare
from radfed.inference.segmentation import read_segmentation
from radfed.inference.study_source import FolderStudy, OrthancStudy, StudySource
from radfed.inference.taskspec import LabelSource, TaskSpec
from radfed.inference.volume import Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TrainingSample:
    """One study in model space: image (C, D, H, W), lesion mask (D, H, W), study label."""

    key: str  # short hash of the StudyInstanceUID (never the UID itself in logs)
    image: npt.NDArray[np.float16]
    lesions: npt.NDArray[np.uint8]
    label: int


@dataclass(frozen=True)
class Rejection:
    key: str
    reason: str


@dataclass
class ReadinessReport:
    """What a site can contribute; only these counts ever leave the site."""

    found: int = 0
    usable: int = 0
    positives: int = 0
    rejected: list[Rejection] = field(default_factory=list)

    def rejection_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rejection in self.rejected:
            kind = rejection.reason.split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def as_metrics(self) -> dict[str, int]:
        return {
            "studies_found": self.found,
            "studies_usable": self.usable,
            "studies_rejected": len(self.rejected),
            "label_positive": self.positives,
            "label_negative": self.usable - self.positives,
        }


class CohortError(RadfedError, ValueError):
    """A study cannot be part of the cohort; the message says why."""


def study_key(study_instance_uid: str) -> str:
    return hashlib.sha256(study_instance_uid.encode()).hexdigest()[:12]


def read_label_table(path: Path, key_column: str) -> dict[str, str]:
    """labels.csv -> {key: row as JSON}; the key column is StudyInstanceUID or AccessionNumber."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and key_column not in rows[0]:
        raise CohortError(f"{path} has no column {key_column!r}")
    return {row[key_column]: json.dumps(row) for row in rows}


def study_label(source: StudySource, spec: TaskSpec, table: Mapping[str, str]) -> int:
    labels = spec.classification_labels
    if labels.source is LabelSource.SR:
        raise CohortError("labels: SR-coded labels are not available for this source")
    key = source.study_instance_uid if labels.key == "StudyInstanceUID" else source.accession_number
    row_json = table.get(key)
    if row_json is None:
        raise CohortError(f"labels: no row for this study's {labels.key}")
    row = json.loads(row_json)
    if labels.column not in row:
        raise CohortError(f"labels: column {labels.column!r} missing")
    return int(str(row[labels.column]).strip().lower() in labels.positive_values)


def reference_lesions(
    source: StudySource, spec: TaskSpec, reference: Volume, reference_series_uid: str
) -> npt.NDArray[np.uint8]:
    """Union of the lesion segments of the reference SEG(s) drawn on the reference series."""
    segs = [info for info in source.series() if info.modality == "SEG"]
    if not segs:
        raise CohortError("reference-seg: the study has no DICOM SEG")
    mask = np.zeros(reference.shape, dtype=np.uint8)
    placed = 0
    for info in segs:
        for ds in source.datasets(info):
            referenced = {str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])}
            if referenced and reference_series_uid not in referenced:
                continue
            seg = read_segmentation(ds, reference)
            for segment in seg.segments:
                if spec.segmentation_labels.is_lesion(segment.property_type):
                    mask |= seg.masks[segment.segment_number].astype(np.uint8)
            placed += 1
    if not placed:
        raise CohortError("reference-seg: no SEG references the selected reference series")
    return mask


def build_sample(
    source: StudySource,
    spec: TaskSpec,
    table: Mapping[str, str],
    harmonisation: Mapping[str, Sequence[float]] | None,
) -> tuple[TrainingSample, dict[str, list[float]]]:
    """One study -> training sample (and its intensity landmarks per channel, for harmonisation)."""
    key = study_key(source.study_instance_uid)
    label = study_label(source, spec, table)
    loaded = load_study(source, spec)
    reference_uid = loaded.selection.chosen[spec.reference_channel.name].series_instance_uid
    lesions = reference_lesions(source, spec, loaded.reference, reference_uid)
    prepared = prepare(loaded, spec, harmonisation)
    on_model = labels_to_model_grid(loaded.reference.with_array(lesions), prepared.model_grid)
    landmarks = {name: landmarks_of(volume.array).tolist() for name, volume in loaded.channels.items()}
    return TrainingSample(key, prepared.image.astype(np.float16), on_model, label), landmarks


def folder_studies(root: Path) -> Iterator[tuple[FolderStudy | None, Path, Path | None]]:
    """(study, folder, labels.csv) for a synth root (site-*/study-*), a site folder, or a study folder."""
    if (root / "labels.csv").is_file():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            yield _open_folder(folder), folder, root / "labels.csv"
    elif any(root.glob("site-*/labels.csv")):
        for site in sorted(root.glob("site-*")):
            yield from folder_studies(site)
    else:
        yield _open_folder(root), root, None


def _open_folder(folder: Path) -> FolderStudy | None:
    try:
        return FolderStudy(folder)
    except RadfedError:
        return None


class SiteCohort:
    """The cohort of one site: build once, cache to disk, report readiness."""

    def __init__(self, spec: TaskSpec, cache_dir: Path | None = None) -> None:
        self.spec = spec
        self.cache_dir = cache_dir
        self.samples: list[TrainingSample] = []
        self.report = ReadinessReport()
        self.landmarks: list[dict[str, list[float]]] = []

    def _cache_path(self, source: StudySource, harmonisation: Mapping[str, Sequence[float]] | None) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(
            (source.study_instance_uid + self.spec.source_text + json.dumps(harmonisation, sort_keys=True)).encode()
        ).hexdigest()[:24]
        return self.cache_dir / f"{digest}.npz"

    def add(
        self,
        source: StudySource,
        table: Mapping[str, str],
        harmonisation: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        self.report.found += 1
        key = study_key(source.study_instance_uid)
        cached = self._cache_path(source, harmonisation)
        try:
            if cached is not None and cached.is_file():
                data = np.load(cached)
                sample = TrainingSample(key, data["image"], data["lesions"], int(data["label"]))
                self.landmarks.append(json.loads(str(data["landmarks"])))
            else:
                sample, landmarks = build_sample(source, self.spec, table, harmonisation)
                self.landmarks.append(landmarks)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(
                        cached,
                        image=sample.image,
                        lesions=sample.lesions,
                        label=sample.label,
                        landmarks=json.dumps(landmarks),
                    )
        except RadfedError as exc:
            reason = str(exc)
            if not isinstance(exc, CohortError):
                reason = f"{type(exc).__name__}: {reason}"
            self.report.rejected.append(Rejection(key, reason))
            logger.warning("study %s rejected: %s", key, reason)
            return
        self.samples.append(sample)
        self.report.usable += 1
        self.report.positives += sample.label

    def add_folder(self, root: Path, harmonisation: Mapping[str, Sequence[float]] | None = None) -> None:
        tables: dict[Path, dict[str, str]] = {}
        for study, folder, labels in folder_studies(root):
            if study is None:
                self.report.found += 1
                self.report.rejected.append(Rejection(folder.name, "unreadable: no DICOM study in the folder"))
                continue
            if labels is not None and labels not in tables:
                tables[labels] = read_label_table(labels, self.spec.classification_labels.key)
            self.add(study, tables.get(labels, {}) if labels else {}, harmonisation)

    def add_orthanc(
        self, client: OrthancClient, labels: Path, harmonisation: Mapping[str, Sequence[float]] | None = None
    ) -> None:
        table = read_label_table(labels, self.spec.classification_labels.key)
        for study_id in client.studies():
            self.add(OrthancStudy(client, study_id), table, harmonisation)


def cohort_from_sources(
    spec: TaskSpec,
    sources: Iterable[str],
    *,
    labels: Path | None = None,
    cache_dir: Path | None = None,
    harmonisation: Mapping[str, Sequence[float]] | None = None,
) -> SiteCohort:
    """A cohort from folders and/or Orthanc URLs (``http://user:pw@host:port``; then ``labels`` is needed)."""
    cohort = SiteCohort(spec, cache_dir)
    for source in sources:
        if source.startswith(("http://", "https://")):
            if labels is None:
                raise CohortError("an Orthanc source needs a labels CSV (--labels)")
            with OrthancClient(OrthancEndpoint.from_url(source)) as client:
                cohort.add_orthanc(client, labels, harmonisation)
        else:
            cohort.add_folder(Path(source), harmonisation)
    return cohort
