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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from radfed.federation.learning.datasets import is_dataset_folder, read_dataset
from radfed.inference.dicom.resample import resample_to
from radfed.inference.dicom.seg_reader import FRACTIONAL_THRESHOLD, SegmentationOnGrid, read_segmentation
from radfed.inference.dicom.study_source import FolderStudy, OrthancStudy, StudySource
from radfed.inference.dicom.volume import Volume
from radfed.inference.errors import RadfedError
from radfed.inference.model.plan import (
    ChannelStatistics,
    ComputeBudget,
    DatasetFingerprint,
    StudyFingerprint,
    derive_plan,
)
from radfed.inference.model.taskspec import LabelSource, TaskSpec
from radfed.inference.orthanc.client import OrthancClient, OrthancEndpoint
from radfed.inference.pipeline.preprocess import (
    foreground,
    labels_to_model_grid,
    landmarks_of,
    load_study,
    model_grid_for,
    normalize_channels,
)

logger = logging.getLogger(__name__)


UNKNOWN_LABEL = -1  # no class label for the study: left out of the classification loss and figures
# Rejection reason (the text before the colon) of a study whose reference SEG marks nothing: kept, it would
# silently teach "no lesion" (FRACTIONAL SEGs storing 1/255 for "inside" read empty at the standard's 0.5).
EMPTY_REFERENCE_SEG = "empty-reference-seg"


@dataclass(frozen=True, eq=False)
class TrainingSample:
    """One study in model space: image (C, D, H, W), lesion mask (D, H, W), study label (1, 0 or
    UNKNOWN_LABEL)."""

    key: str  # short hash of the StudyInstanceUID (never the UID itself in logs)
    image: npt.NDArray[np.float16]
    lesions: npt.NDArray[np.uint8]
    label: int
    voxel_mm3: float = 1.0


@dataclass(frozen=True, eq=False)
class CohortEntry:
    """What the site caches per study: channels resampled onto the model grid but not yet normalised, so
    that a federation's harmonisation can be applied later without fetching the study again."""

    key: str
    raw: npt.NDArray[np.float32]
    lesions: npt.NDArray[np.uint8]
    label: int
    voxel_mm3: float
    landmarks: dict[str, list[float]]  # per channel, on the model grid
    fingerprint: StudyFingerprint | None = None  # native grid + foreground statistics, for the plan

    def sample(self, spec: TaskSpec, harmonisation: Mapping[str, Sequence[float]] | None) -> TrainingSample:
        image = normalize_channels(self.raw, spec, harmonisation).astype(np.float16)
        return TrainingSample(self.key, image, self.lesions, self.label, self.voxel_mm3)


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
    unknown: int = 0  # usable for segmentation, no class label
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def empty_reference_segs(self) -> int:
        """Studies rejected because their reference SEG is empty (or only below the FRACTIONAL threshold)."""
        return self.rejection_counts().get(EMPTY_REFERENCE_SEG, 0)

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
            "label_negative": self.usable - self.positives - self.unknown,
            "label_unknown": self.unknown,
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
        return UNKNOWN_LABEL  # SR-coded labels are not read yet: segmentation only
    key = source.study_instance_uid if labels.key == "StudyInstanceUID" else source.accession_number
    row_json = table.get(key)
    if row_json is None:
        return UNKNOWN_LABEL  # a study without a label still teaches segmentation
    row = json.loads(row_json)
    if labels.column not in row:
        raise CohortError(f"labels: column {labels.column!r} missing")
    value = str(row[labels.column] or "").strip().lower()
    if not value:
        return UNKNOWN_LABEL  # an empty cell is not a negative
    return int(value in labels.positive_values)


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
            refuse_empty_reference(seg, spec)
            for segment in seg.segments:
                if spec.segmentation_labels.is_lesion(segment.property_type):
                    mask |= seg.masks[segment.segment_number].astype(np.uint8)
            placed += 1
    if not placed:
        raise CohortError("reference-seg: no SEG references the selected reference series")
    return mask


def refuse_empty_reference(seg: SegmentationOnGrid, spec: TaskSpec) -> None:
    """Raise when a reference SEG marks nothing, or a lesion segment holds only fractions below the threshold.

    An empty reference is not evidence of "no lesion": a study without lesions still has its gland (or
    other) segment. Rejecting it, with its own reason, is safer than training on it as lesion-free.
    """
    faint = seg.faint_segments
    if len(seg.empty_segments) == len(seg.segments):
        detail = f"all {len(seg.segments)} segment(s) are empty"
        if faint:
            detail += (
                f"; FRACTIONAL values reach only {max(faint.values()):.4f} of the maximum, below the "
                f"{FRACTIONAL_THRESHOLD} threshold"
            )
        raise CohortError(f"{EMPTY_REFERENCE_SEG}: {detail}")
    faint_lesions = [
        number for number in faint if spec.segmentation_labels.is_lesion(seg.segment(number).property_type)
    ]
    if faint_lesions:
        raise CohortError(
            f"{EMPTY_REFERENCE_SEG}: lesion segment(s) {faint_lesions} hold only FRACTIONAL values below the "
            f"{FRACTIONAL_THRESHOLD} threshold (largest {max(faint[n] for n in faint_lesions):.4f})"
        )


def study_fingerprint(reference: Volume, channels: Mapping[str, npt.NDArray[np.floating]]) -> StudyFingerprint:
    """The plan's view of one study: its native reference grid and each channel's foreground voxels."""
    return StudyFingerprint.of(reference.spacing, reference.shape, {k: foreground(v) for k, v in channels.items()})


def build_entry(source: StudySource, spec: TaskSpec, table: Mapping[str, str]) -> CohortEntry:
    """One study -> its cache entry: model-grid channels, lesion mask, class label, intensity landmarks."""
    label = study_label(source, spec, table)
    loaded = load_study(source, spec)
    reference_uid = loaded.selection.chosen[spec.reference_channel.name].series_instance_uid
    lesions = reference_lesions(source, spec, loaded.reference, reference_uid)
    return entry_on_grid(
        study_key(source.study_instance_uid),
        loaded.reference,
        {name: loaded.channels[name].array for name in spec.channel_names},
        lesions,
        label,
        spec,
    )


def entry_on_grid(
    key: str,
    reference: Volume,
    channels: Mapping[str, npt.NDArray[np.floating]],
    lesions: npt.NDArray[np.uint8],
    label: int,
    spec: TaskSpec,
) -> CohortEntry:
    """A study already on its reference grid (channels aligned) -> its cache entry on the model grid."""
    grid = model_grid_for(reference, spec.spacing_mm)
    raw = np.stack(
        [resample_to(reference.with_array(np.asarray(channels[name])), grid).array for name in spec.channel_names]
    ).astype(np.float32)
    on_model = labels_to_model_grid(reference.with_array(lesions), grid)
    landmarks = {name: landmarks_of(raw[i]).tolist() for i, name in enumerate(spec.channel_names)}
    voxel_mm3 = abs(float(np.linalg.det(grid.affine[:3, :3])))
    fingerprint = study_fingerprint(reference, channels)
    return CohortEntry(key, raw, on_model, label, voxel_mm3, landmarks, fingerprint)


def is_held_out(key: str, fraction: float) -> bool:
    """A fixed share of each site's studies, chosen by the study's hash, is never trained on: the
    federation's evaluation set (pooled over sites, it is the held-out test set of the benchmarks)."""
    return int(key[:8], 16) % 1000 < fraction * 1000


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


CACHE_FORMAT = "cohort-entry/4"  # 4: entries cached before empty reference SEGs were refused are rebuilt


class SiteCohort:
    """The cohort of one site: build once, cache to disk, report readiness; samples are normalised on
    demand (with the federation's harmonisation once it is known)."""

    def __init__(self, spec: TaskSpec, cache_dir: Path | None = None) -> None:
        self.spec = spec
        self.cache_dir = cache_dir
        self.entries: list[CohortEntry] = []
        self.report = ReadinessReport()
        self._samples: dict[str, list[TrainingSample]] = {}

    def samples_for(self, harmonisation: Mapping[str, Sequence[float]] | None = None) -> list[TrainingSample]:
        key = json.dumps(harmonisation, sort_keys=True)
        if key not in self._samples:
            self._samples[key] = [entry.sample(self.spec, harmonisation) for entry in self.entries]
        return self._samples[key]

    @property
    def samples(self) -> list[TrainingSample]:
        return self.samples_for(None)

    def split(
        self, held_out_fraction: float, harmonisation: Mapping[str, Sequence[float]] | None = None
    ) -> tuple[list[TrainingSample], list[TrainingSample]]:
        """(training, held-out) samples; a cohort too small to spare a study trains on all of it."""
        samples = self.samples_for(harmonisation)
        held = [s for s in samples if is_held_out(s.key, held_out_fraction)]
        train = [s for s in samples if not is_held_out(s.key, held_out_fraction)]
        return (samples, []) if not train else (train, held)

    def channel_landmarks(self, held_out_fraction: float = 0.0) -> dict[str, list[float]]:
        """Mean intensity landmarks per channel over the training studies: the only thing harmonisation
        shares with the coordinator (aggregate percentiles, never an image or a per-study value)."""
        used = [e for e in self.entries if not is_held_out(e.key, held_out_fraction)] or self.entries
        return {name: np.mean([e.landmarks[name] for e in used], axis=0).tolist() for name in self.spec.channel_names}

    def fingerprint(self) -> DatasetFingerprint | None:
        """The training studies' fingerprint (None for an empty cohort)."""
        prints = [e.fingerprint for e in self.entries if e.fingerprint is not None]
        return DatasetFingerprint.from_studies(prints) if prints else None

    def _cache_path(self, study_uid: str) -> Path | None:
        if self.cache_dir is None:
            return None
        grid = json.dumps(self.spec.spacing_mm)
        digest = hashlib.sha256((CACHE_FORMAT + study_uid + self.spec.source_text + grid).encode()).hexdigest()[:24]
        return self.cache_dir / f"{digest}.npz"

    def _load_cached(self, key: str, path: Path) -> CohortEntry:
        with np.load(path) as data:
            fingerprint = json.loads(str(data["fingerprint"]))
            return CohortEntry(
                key,
                data["raw"],
                data["lesions"],
                int(data["label"]),
                float(data["voxel_mm3"]),
                json.loads(str(data["landmarks"])),
                _fingerprint_from(fingerprint),
            )

    @staticmethod
    def _save_cached(path: Path, entry: CohortEntry) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            raw=entry.raw,
            lesions=entry.lesions,
            label=entry.label,
            voxel_mm3=entry.voxel_mm3,
            landmarks=json.dumps(entry.landmarks),
            fingerprint=json.dumps(asdict(entry.fingerprint) if entry.fingerprint else None),
        )

    def add_entry(self, entry: CohortEntry) -> None:
        self.entries.append(entry)
        self._samples.clear()
        self.report.usable += 1
        self.report.positives += int(entry.label == 1)
        self.report.unknown += int(entry.label == UNKNOWN_LABEL)

    def add(self, source: StudySource, table: Mapping[str, str]) -> None:
        self.report.found += 1
        key = study_key(source.study_instance_uid)
        cached = self._cache_path(source.study_instance_uid)
        try:
            if cached is not None and cached.is_file():
                entry = self._load_cached(key, cached)
            else:
                entry = build_entry(source, self.spec, table)
                if cached is not None:
                    self._save_cached(cached, entry)
        except RadfedError as exc:
            reason = str(exc)
            if not isinstance(exc, CohortError):
                reason = f"{type(exc).__name__}: {reason}"
            self.report.rejected.append(Rejection(key, reason))
            logger.warning("study %s rejected: %s", key, reason)
            return
        self.add_entry(entry)

    def add_folder(self, root: Path) -> None:
        tables: dict[Path, dict[str, str]] = {}
        for study, folder, labels in folder_studies(root):
            if study is None:
                self.report.found += 1
                self.report.rejected.append(Rejection(folder.name, "unreadable: no DICOM study in the folder"))
                continue
            if labels is not None and labels not in tables:
                tables[labels] = read_label_table(labels, self.spec.classification_labels.key)
            self.add(study, tables.get(labels, {}) if labels else {})

    def add_dataset(self, root: Path) -> None:
        """The cases of an MSD / nnU-Net raw dataset folder (no class labels: "unknown")."""
        for case in read_dataset(root, self.spec):
            self.report.found += 1
            key = study_key(f"{root.name}/{case.case_id}")
            self.add_entry(entry_on_grid(key, case.reference, case.channels, case.lesions, UNKNOWN_LABEL, self.spec))

    def add_orthanc(self, client: OrthancClient, labels: Path) -> None:
        table = read_label_table(labels, self.spec.classification_labels.key)
        for study_id in client.studies():
            self.add(OrthancStudy(client, study_id), table)


def _fingerprint_from(data: Mapping[str, Any] | None) -> StudyFingerprint | None:
    if data is None:
        return None
    return StudyFingerprint(
        tuple(data["spacing_mm"]),
        tuple(data["shape"]),
        {k: ChannelStatistics(**v) for k, v in data["channels"].items()},
    )


def _fingerprints(spec: TaskSpec, studies: Iterable[StudySource]) -> list[StudyFingerprint]:
    prints = []
    for study in studies:
        try:
            loaded = load_study(study, spec)
        except RadfedError as exc:
            logger.info("fingerprint: study skipped (%s)", type(exc).__name__)
            continue
        prints.append(study_fingerprint(loaded.reference, {k: v.array for k, v in loaded.channels.items()}))
    return prints


def source_fingerprints(spec: TaskSpec, sources: Iterable[str], labels: Path | None) -> list[StudyFingerprint]:
    """First pass for a plan that must choose the grid: each study's native grid and intensities. Loading a
    DICOM study twice is the price of not holding every native volume in memory."""
    prints: list[StudyFingerprint] = []
    for source in sources:
        if is_dataset_folder(Path(source)):
            prints += [study_fingerprint(case.reference, case.channels) for case in read_dataset(Path(source), spec)]
            continue
        if source.startswith(("http://", "https://")):
            with OrthancClient(OrthancEndpoint.from_url(source)) as client:
                prints += _fingerprints(spec, [OrthancStudy(client, study_id) for study_id in client.studies()])
        else:
            prints += _fingerprints(spec, [s for s, _, _ in folder_studies(Path(source)) if s is not None])
    return prints


def cohort_from_sources(
    spec: TaskSpec,
    sources: Iterable[str],
    *,
    labels: Path | None = None,
    cache_dir: Path | None = None,
    budget: ComputeBudget | None = None,
) -> SiteCohort:
    """A cohort from folders (radfed synth, DICOM studies, or a Medical Segmentation Decathlon / nnU-Net raw
    dataset) and/or Orthanc URLs (``http://user:pw@host:port``; then ``labels`` is needed). A spec without a
    plan gets one here, from this cohort's fingerprint: ``cohort.spec`` is the planned spec."""
    sources = list(sources)
    if spec.plan is None and spec.preprocessing.spacing_mm is None:
        prints = source_fingerprints(spec, sources, labels)
        if prints:
            spec = spec.planned(derive_plan(spec.plan_overrides(), DatasetFingerprint.from_studies(prints), budget))
    cohort = SiteCohort(spec, cache_dir)
    for source in sources:
        if source.startswith(("http://", "https://")):
            if labels is None:
                raise CohortError("an Orthanc source needs a labels CSV (--labels)")
            with OrthancClient(OrthancEndpoint.from_url(source)) as client:
                cohort.add_orthanc(client, labels)
        elif is_dataset_folder(Path(source)):
            cohort.add_dataset(Path(source))
        else:
            cohort.add_folder(Path(source))
    if cohort.spec.plan is None and cohort.entries:
        cohort.spec = cohort.spec.planned(derive_plan(spec.plan_overrides(), cohort.fingerprint(), budget))
    return cohort
