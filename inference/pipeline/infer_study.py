"""Clinical inference for one study: select, load, preprocess, run the model, postprocess into lesions.

The DICOM writing, QA and storage that follow are the caller's (radfed.dicom_sr and radfed.plugin).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radfed.inference.dicom.resample import resample_above
from radfed.inference.dicom.study_source import StudySource
from radfed.inference.model.runtime import OnnxModel
from radfed.inference.pipeline.findings import InferenceResult, LesionFinding, StudyFinding
from radfed.inference.pipeline.input_plan import InputPlan
from radfed.inference.pipeline.lesions import extract_lesions, measure_lesion
from radfed.inference.pipeline.preprocess import LoadedStudy, PreparedStudy, load_study, prepare
from radfed.inference.timing import StageTimer


@dataclass(frozen=True, eq=False)
class StudyAnalysis:
    result: InferenceResult
    loaded: LoadedStudy
    provider: str
    windows: int


def analyse_study(
    source: StudySource, model: OnnxModel, timer: StageTimer | None = None, plan: InputPlan | None = None
) -> StudyAnalysis:
    """Run the artifact's task on one study (exactly ``plan``'s instances when given); stage times accumulate
    in ``timer``."""
    timer = timer or StageTimer()
    return analyse_prepared(prepare_study(source, model, timer, plan), model, timer)


def prepare_study(
    source: StudySource, model: OnnxModel, timer: StageTimer | None = None, plan: InputPlan | None = None
) -> PreparedStudy:
    """Planning (unless ``plan`` is given), loading and the model's exact preprocessing (the part that can run
    before a study is stable)."""
    timer = timer or StageTimer()
    spec = model.artifact.spec
    with timer.stage("load"):
        loaded = load_study(source, spec, plan)
    with timer.stage("preprocess"):
        return prepare(loaded, spec, model.artifact.harmonisation)


def analyse_prepared(prepared: PreparedStudy, model: OnnxModel, timer: StageTimer | None = None) -> StudyAnalysis:
    """The model and postprocessing into lesions and a study finding, on an already prepared study."""
    timer = timer or StageTimer()
    spec = model.artifact.spec
    loaded = prepared.loaded
    with timer.stage("model"):
        prediction = model.predict(prepared.image)
    with timer.stage("postprocess"):
        probability = prepared.model_grid.with_array(prediction.probability)
        on_reference = resample_above(probability, loaded.reference, spec.outputs.lesion_threshold).array
        candidates = extract_lesions(
            on_reference,
            loaded.reference,
            threshold=spec.outputs.lesion_threshold,
            min_volume_mm3=spec.outputs.min_lesion_volume_mm3,
            min_fraction=spec.outputs.lesion_fraction,
            min_slices=spec.outputs.lesion_slices,
            model_slice_mm=prepared.model_grid.spacing[0],
            max_lesions=spec.outputs.max_lesions,
        )
        labels = np.zeros(loaded.reference.shape, dtype=np.uint16)
        adc = loaded.channels.get(spec.outputs.adc_channel) if spec.outputs.adc_channel else None
        lesions = []
        for number, candidate in enumerate(candidates, start=1):
            labels[candidate.mask] = number
            lesions.append(
                LesionFinding(number, candidate.probability, measure_lesion(candidate.mask, loaded.reference, adc))
            )
        study_probability = prediction.study_score(spec.outputs.study_score)
        codes = spec.outputs.codes
        result = InferenceResult(
            grid=loaded.reference,
            source_datasets=loaded.reference_datasets,  # type: ignore[arg-type]
            lesion_labels=labels,
            lesions=tuple(lesions),
            study_finding=StudyFinding(study_probability, codes.category_for(study_probability)),
            model=model.artifact.identity,
            codes=codes,
            input_fingerprint=loaded.fingerprint,
            evidence_datasets=loaded.evidence_datasets,  # type: ignore[arg-type]
        )
    return StudyAnalysis(result, loaded, model.provider, prediction.windows)
