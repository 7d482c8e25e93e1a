"""Task specs: the shipped ones load; malformed ones fail naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from radfed.inference.model.plan import PlanError
from radfed.inference.model.taskspec import StudyScore, TaskSpecError, load_task_spec, parse_task_spec
from radfed.inference.model.windows import Prediction


def test_default_spec_is_prostate_mpmri() -> None:
    spec = load_task_spec()
    assert spec.channel_names == ("t2w", "adc", "dwi")
    assert spec.reference_channel.name == "t2w"
    assert spec.outputs.codes.category_for(0.9).value == "CSPCA-LIKELY"
    assert spec.outputs.codes.category_for(0.1).value == "CSPCA-UNLIKELY"


def test_second_spec_differs_in_channels_and_labels() -> None:
    spec = load_task_spec("prostate_bpmri_highgrade")
    assert spec.channel_names == ("adc", "t2")
    assert spec.classification_labels.key == "AccessionNumber"
    assert spec.outputs.codes.lesion_label == "Focus"


def _spec_text(**replace: str) -> str:
    text = load_task_spec().source_text
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("reference = true ", "reference = false", "exactly one channel must have reference"),
        (
            "description_regex = '(?i)(adc|apparent diffusion)'",
            "description_regex = '(adc'",
            "channels[1].description_regex",
        ),
        ('key = "StudyInstanceUID"', 'key = "PatientID"', "labels.classification.key"),
        ('architecture = "dynunet"', 'architecture = "dynunett"', "model.architecture"),
        ('norm = "instance"', 'norm = "batch"', "model.norm"),
        ('architecture = "dynunet"', 'architecture = "segresnet"\nresidual = true', "residual already"),
        ('architecture = "dynunet"', 'architecture = "dynunet"\nresidual = "yes"', "model.residual"),
        ("classification_weight = 0.5", "steps = 0", "training.steps"),
        ("classification_weight = 0.5", "time_limit_minutes = 0", "training.steps is needed"),
        ("flip_axes = [2]", "flip_axes = [3]", "training.flip_axes"),
        ("overlap = 0.5 ", "overlap = 1.5 ", "inference.overlap"),
        ('lesion_type = "SCT:108369006:Neoplasm"', 'lesion_type = "108369006"', "outputs.lesion_type"),
        ('study_score = "max"', 'study_score = "mean"', "outputs.study_score"),
        ("max_lesions = 20", "max_lesions = 20\nmin_lesion_fraction = 1.0", "outputs.min_lesion_fraction"),
    ],
)
def test_errors_name_the_field(old: str, new: str, message: str) -> None:
    with pytest.raises(TaskSpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_task_spec(_spec_text(**{old: new}))


def test_the_share_of_the_largest_lesion_is_left_to_the_data_unless_the_spec_sets_it() -> None:
    assert load_task_spec().outputs.min_lesion_fraction is None
    assert load_task_spec().outputs.lesion_fraction == 0.0  # nothing chose it: every size kept
    fixed = parse_task_spec(_spec_text(**{"max_lesions = 20": "max_lesions = 20\nmin_lesion_fraction = 0.1"}))
    assert fixed.outputs.min_lesion_fraction == fixed.outputs.lesion_fraction == 0.1


def test_the_minimum_slice_extent_is_left_to_the_data_unless_the_spec_sets_it() -> None:
    assert load_task_spec().outputs.min_lesion_slices is None and load_task_spec().outputs.lesion_slices == 1
    fixed = parse_task_spec(_spec_text(**{"max_lesions = 20": "max_lesions = 20\nmin_lesion_slices = 2"}))
    assert fixed.outputs.lesion_slices == 2
    with pytest.raises(TaskSpecError, match="min_lesion_slices"):
        parse_task_spec(_spec_text(**{"max_lesions = 20": "max_lesions = 20\nmin_lesion_slices = 0"}))


def test_unknown_shipped_name_lists_the_shipped_ones() -> None:
    with pytest.raises(TaskSpecError, match="prostate_mpmri"):
        load_task_spec("brain_glioma")


def test_study_score_rules() -> None:
    assert load_task_spec().outputs.study_score is StudyScore.MAX
    lesion_map = np.zeros((4, 8, 8), np.float32)
    lesion_map[1, 2, 3] = 0.9
    prediction = Prediction(lesion_map, study_probability=0.3, windows=1)
    assert prediction.study_score(StudyScore.CLASSIFIER) == pytest.approx(0.3)
    assert prediction.study_score(StudyScore.LESION) == pytest.approx(0.9)
    assert prediction.study_score(StudyScore.MAX) == pytest.approx(0.9)
    assert Prediction(lesion_map * 0, 0.3, 1).study_score(StudyScore.MAX) == pytest.approx(0.3)
    # a spec without the key keeps the classification head's probability
    text = load_task_spec().source_text.replace('study_score = "max"', "")
    assert parse_task_spec(text).outputs.study_score is StudyScore.CLASSIFIER


def test_a_spec_without_sr_codes_gets_generic_ones() -> None:
    """Any lesion task, not only prostate: the SR codes are optional."""
    text = _spec_text()
    start, end = text.index("procedure = "), text.index("adc_channel = ")
    text = text[:start] + text[end:]
    text = text[: text.index("[[outputs.categories]]")]
    codes = parse_task_spec(text).outputs.codes
    assert codes.lesion_finding_type.meaning == "Lesion" and codes.procedure.value == "113014"
    assert [c.code.value for c in codes.categories] == ["FINDING-UNLIKELY", "FINDING-LIKELY"]


def test_the_shipped_spec_leaves_the_grid_to_the_plan() -> None:
    spec = load_task_spec()
    assert spec.plan is None and spec.preprocessing.spacing_mm is None and spec.preprocessing.patch_size is None
    with pytest.raises(PlanError, match="patch size"):
        _ = spec.patch_size
    assert spec.training.optimizer.value == "adamw" and spec.training.flip_axes == (2,)
    assert spec.inference.overlap == 0.5 and spec.inference.gaussian


def test_a_fixed_grid_and_the_first_waves_network_still_parse() -> None:
    spec = load_task_spec("prostate_bpmri_highgrade")
    assert spec.preprocessing.spacing_mm == (3.5, 1.0, 1.0) and spec.preprocessing.patch_size == (12, 64, 64)
    assert spec.model.architecture.value == "unet3d"
