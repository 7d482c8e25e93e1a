"""Inference results built from synthetic studies (ground-truth lesions stand in for predictions)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from radfed.inference.coding import CodedTerm
from radfed.inference.dicom.resample import resample_to
from radfed.inference.dicom.series import volume_from_datasets
from radfed.inference.pipeline.findings import (
    ClassCategory,
    InferenceResult,
    LesionFinding,
    ModelIdentity,
    StudyFinding,
    TaskCodes,
    input_fingerprint,
)
from radfed.inference.pipeline.lesions import measure_lesion
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import SyntheticStudy, render_study

PROSTATE_CODES = TaskCodes(
    procedure=CodedTerm("719178004", "SCT", "Multiparametric MRI of prostate"),
    finding_site=CodedTerm("41216001", "SCT", "Prostate"),
    lesion_label="Lesion",
    lesion_category=CodedTerm("49755003", "SCT", "Morphologically Abnormal Structure"),
    lesion_type=CodedTerm("108369006", "SCT", "Neoplasm"),
    lesion_finding_type=CodedTerm("130555", "DCM", "Localized Prostate Finding"),
    study_finding_type=CodedTerm("130554", "DCM", "Overall Prostate Finding"),
    probability_concept=CodedTerm("111047", "DCM", "Probability of cancer"),
    classification_concept=CodedTerm("CSPCA", "99RADFED", "Clinically significant prostate cancer"),
    categories=(
        ClassCategory(CodedTerm("CSPCA-UNLIKELY", "99RADFED", "csPCa unlikely"), 0.0),
        ClassCategory(CodedTerm("CSPCA-LIKELY", "99RADFED", "csPCa likely"), 0.5),
    ),
    no_finding=CodedTerm("111286", "DCM", "No abnormality"),
)

# A different task: nothing in the writers may assume prostate.
BRAIN_CODES = TaskCodes(
    procedure=CodedTerm("BRAIN-MRI", "99RADFED", "Multimodal MRI of brain"),
    finding_site=CodedTerm("12738006", "SCT", "Brain"),
    lesion_label="Tumour",
    lesion_category=CodedTerm("49755003", "SCT", "Morphologically Abnormal Structure"),
    lesion_type=CodedTerm("108369006", "SCT", "Neoplasm"),
    lesion_finding_type=CodedTerm("TUMOUR", "99RADFED", "Brain tumour finding"),
    study_finding_type=CodedTerm("GRADE", "99RADFED", "Tumour grade finding"),
    probability_concept=CodedTerm("HGG-P", "99RADFED", "Probability of high-grade glioma"),
    classification_concept=CodedTerm("WHO-GRADE", "99RADFED", "WHO grade"),
    categories=(
        ClassCategory(CodedTerm("LGG", "99RADFED", "Low-grade glioma"), 0.0),
        ClassCategory(CodedTerm("HGG", "99RADFED", "High-grade glioma"), 0.6),
    ),
    no_finding=CodedTerm("111286", "DCM", "No abnormality"),
)

MODEL = ModelIdentity("prostate-lesions", "1.0.0")

ResultFactory = Callable[..., tuple[InferenceResult, SyntheticStudy]]


def result_from_study(
    study: SyntheticStudy, model: ModelIdentity = MODEL, codes: TaskCodes = PROSTATE_CODES
) -> InferenceResult:
    t2 = volume_from_datasets(study.series[Sequence.T2W])
    adc = resample_to(volume_from_datasets(study.series[Sequence.ADC]), t2)
    lesions = []
    for number in range(1, len(study.phantom.lesions) + 1):
        mask = study.lesion_masks == number
        grade = study.phantom.lesions[number - 1].grade_group
        lesions.append(LesionFinding(number, 0.3 + 0.12 * grade, measure_lesion(mask, t2, adc)))
    probability = float(max((lesion.probability for lesion in lesions), default=0.05))
    return InferenceResult(
        grid=t2,
        source_datasets=tuple(study.series[Sequence.T2W]),
        lesion_labels=study.lesion_masks.astype(np.uint8),
        lesions=tuple(lesions),
        study_finding=StudyFinding(probability, codes.category_for(probability)),
        model=model,
        codes=codes,
        input_fingerprint=input_fingerprint(ds.SOPInstanceUID for q in Sequence for ds in study.series[q]),
        evidence_datasets=tuple(study.series[Sequence.ADC]) + tuple(study.series[Sequence.DWI]),
    )


_CACHE: dict[tuple[int, bool], SyntheticStudy] = {}


@pytest.fixture(scope="session")
def make_result() -> ResultFactory:
    """``make_result(n_lesions, oblique)`` -> (result, study), cached per case."""

    def make(n_lesions: int, oblique: bool, **kwargs: object) -> tuple[InferenceResult, SyntheticStudy]:
        key = (n_lesions, oblique)
        if key not in _CACHE:
            _CACHE[key] = render_study(
                site_profile(2, small=True), 40 + n_lesions, 21, n_lesions=n_lesions, oblique=oblique
            )
        study = _CACHE[key]
        return result_from_study(study, **kwargs), study  # type: ignore[arg-type]

    return make


def lesion_voxels(result: InferenceResult) -> int:
    return int(np.count_nonzero(result.lesion_labels))
