"""What inference produces, as plain values: lesions with measurements, a study-level finding, the model
that produced them and the task's output codes. The DICOM writers (radfed.dicom_sr) consume these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from radfed.inference.coding import CodedTerm
from radfed.inference.dicom.volume import Volume


@dataclass(frozen=True)
class ClassCategory:
    """One study-level category; it applies when the probability is at least ``min_probability``."""

    code: CodedTerm
    min_probability: float


@dataclass(frozen=True)
class TaskCodes:
    """The codes a task emits (from its task spec): nothing in the writers is task-specific.

    Parameters
    ----------
    procedure
        Procedure reported (e.g. SCT 719178004 "Multiparametric MRI of prostate").
    finding_site
        Anatomic site of the findings, or None.
    lesion_label
        Segment label prefix; lesion n is labelled ``f"{lesion_label} {n}"``.
    lesion_category, lesion_type
        Segmented property category and type of lesion segments.
    lesion_finding_type, study_finding_type
        SR finding types of lesion groups and of the study-level group.
    probability_concept
        Name of the probability NUM (e.g. DCM 111047 "Probability of cancer").
    classification_concept
        Name of the category CODE item.
    categories
        Study-level categories, chosen by probability thresholds.
    no_finding
        What the SR says when nothing was found.
    """

    procedure: CodedTerm
    finding_site: CodedTerm | None
    lesion_label: str
    lesion_category: CodedTerm
    lesion_type: CodedTerm
    lesion_finding_type: CodedTerm
    study_finding_type: CodedTerm
    probability_concept: CodedTerm
    classification_concept: CodedTerm
    categories: tuple[ClassCategory, ...]
    no_finding: CodedTerm

    def __post_init__(self) -> None:
        if not self.categories:
            raise ValueError("categories must not be empty")
        thresholds = [c.min_probability for c in self.categories]
        if thresholds != sorted(thresholds) or thresholds[0] != 0.0:
            raise ValueError("category thresholds must ascend from 0.0")

    @property
    def positive_threshold(self) -> float:
        """The study-level decision threshold: where the second (first suspicious) category starts."""
        return self.categories[1].min_probability if len(self.categories) > 1 else 0.5

    def category_for(self, probability: float) -> CodedTerm:
        chosen = self.categories[0].code
        for category in self.categories:
            if probability >= category.min_probability:
                chosen = category.code
        return chosen


@dataclass(frozen=True)
class ModelIdentity:
    """The model that produced a result (it names the result series and their UIDs)."""

    name: str
    version: str
    manufacturer: str = "radfed"

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("model name and version are required")


@dataclass(frozen=True)
class LesionMeasurements:
    """Measurements of one lesion; in-plane geometry is on its key slice (the largest cross-section).

    ``outline_rc``, ``long_axis_rc`` and ``short_axis_rc`` are (row, column) voxel-centre coordinates
    on slice ``key_slice`` of the reference grid.
    """

    volume_mm3: float
    long_axis_mm: float
    short_axis_mm: float
    key_slice: int
    outline_rc: tuple[tuple[float, float], ...]
    long_axis_rc: tuple[tuple[float, float], tuple[float, float]]
    short_axis_rc: tuple[tuple[float, float], tuple[float, float]]
    centroid_lps: tuple[float, float, float]
    voxel_count: int
    mean_adc: float | None = None


@dataclass(frozen=True)
class LesionFinding:
    """One lesion: its probability and measurements; its voxels are ``number`` in the result's labels."""

    number: int  # 1-based, also its segment number in the SEG
    probability: float
    measurements: LesionMeasurements
    category: CodedTerm | None = None


@dataclass(frozen=True)
class StudyFinding:
    probability: float
    category: CodedTerm


@dataclass(frozen=True, eq=False)
class InferenceResult:
    """Everything the writers need for one study and one model.

    ``source_datasets`` are the instances of the reference series (the grid the labels live on, the
    series the radiologist reads); ``evidence_datasets`` other inputs (e.g. ADC, DWI) to cite.
    ``lesion_labels`` holds, per voxel of the grid, 0 or the number of the lesion it belongs to (one
    integer volume instead of a mask per lesion: lesions never overlap, and 50 lesions on a CT grid
    stay at one volume of memory).
    """

    grid: Volume
    source_datasets: tuple[Dataset, ...]
    lesion_labels: npt.NDArray[np.integer]
    lesions: tuple[LesionFinding, ...]
    study_finding: StudyFinding
    model: ModelIdentity
    codes: TaskCodes
    input_fingerprint: str
    evidence_datasets: tuple[Dataset, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.source_datasets:
            raise ValueError("source_datasets must hold the reference series")
        if self.lesion_labels.shape != self.grid.shape:
            raise ValueError(f"lesion labels {self.lesion_labels.shape} are not on the grid {self.grid.shape}")
        numbers = [lesion.number for lesion in self.lesions]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"lesions must be numbered 1..n in order, got {numbers}")
        counts = np.bincount(self.lesion_labels.ravel(), minlength=len(numbers) + 1)
        if len(counts) > len(numbers) + 1 or (len(numbers) and not counts[1:].all()):
            raise ValueError(f"lesion labels must hold exactly the lesions 1..{len(numbers)}, each non-empty")

    def lesion_mask(self, number: int) -> npt.NDArray[np.bool_]:
        return np.asarray(self.lesion_labels == number)

    @property
    def study_instance_uid(self) -> str:
        return str(self.source_datasets[0].StudyInstanceUID)


def input_fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """A short stable digest of the input instances (sorted SOP Instance UIDs of the selected series).

    Instances arriving late change it, which gives a superseding result.
    """
    digest = hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode())
    return digest.hexdigest()[:32]
