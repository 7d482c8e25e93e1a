"""2.5-D input (``[model] context_slices``): a 2-D network that also sees its slice's neighbours as channels.
Training crops and the node's sliding windows stack the neighbours the same way, the ONNX contract carries the
wider input, and old plans without the key read as 2-D."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.evaluation import evaluate_model
from radfed.federation.learning.export import PARITY_TOLERANCE, export_onnx, parity_error
from radfed.federation.learning.training import PatchSampler, TrainingSettings, new_model, train_local
from radfed.inference.model.plan import Plan
from radfed.inference.model.taskspec import TaskSpec, TaskSpecError, load_task_spec, parse_task_spec
from radfed.inference.model.windows import predict_study, with_context
from tests.small_model import small_spec


def _spec(context: int) -> TaskSpec:
    spec = small_spec(context)
    return replace(spec, training=replace(spec.training, augmentations=(), warmup_steps=0, time_limit_minutes=0))


def test_neighbouring_slices_are_stacked_as_channels_with_the_ends_repeated() -> None:
    image = np.arange(2 * 4 * 1 * 1, dtype=np.float32).reshape(2, 4, 1, 1)  # channel c, slice z: 4c + z
    stacked = with_context(image, 1)
    assert stacked.shape == (6, 4, 1, 1)
    # block 0: every channel one slice down (slice 0 repeated), block 1: as is, block 2: one slice up
    assert stacked[:, :, 0, 0].tolist() == [
        [0, 0, 1, 2], [4, 4, 5, 6], [0, 1, 2, 3], [4, 5, 6, 7], [1, 2, 3, 3], [5, 6, 7, 7]
    ]  # fmt: skip
    assert with_context(image, 0) is image


def test_training_crops_stack_the_neighbours_as_inference_does() -> None:
    spec = _spec(1)
    assert spec.input_channels == 3 * len(spec.channels) == 9
    z = np.arange(6, dtype=np.float32)[None, :, None, None]
    image = (np.arange(3, dtype=np.float32)[:, None, None, None] * 100 + z) * np.ones((3, 6, 40, 40), np.float32)
    lesions = np.zeros((6, 40, 40), np.uint8)
    lesions[0, 5:9, 5:9] = 1  # a lesion on the first slice: the crop's lower neighbour is the slice itself
    sample = TrainingSample("s", image.astype(np.float16), lesions, 1, voxel_mm3=3.0)
    crop, mask, _ = PatchSampler(spec, spec.training, seed=0).crop(sample, force_foreground=True)
    assert crop.shape == (9, 1, 32, 32) and mask.shape == (1, 32, 32) and mask.any()
    expected = with_context(image, 1)[:, 0]  # slice 0 of the stacked volume
    assert np.allclose(crop[:, 0, 0, 0], expected[:, 0, 0])


def test_a_2_5_d_network_trains_exports_with_parity_and_predicts_whole_studies(tmp_path: Path) -> None:
    spec = _spec(1)
    assert spec.plan is not None and spec.plan.network.context_slices == 1
    model = new_model(spec, seed=0)
    rng = np.random.default_rng(0)
    lesions = np.zeros((5, 40, 40), np.uint8)
    lesions[1:4, 10:20, 10:20] = 1
    image = (rng.normal(size=(3, 5, 40, 40)) + 2 * lesions).astype(np.float16)
    samples = [TrainingSample("a", image, lesions, 1, voxel_mm3=3.0)]
    log = train_local(model, samples, spec, TrainingSettings.from_spec(spec, steps=3))
    assert log.steps == 3
    export_onnx(model, spec, tmp_path / "model.onnx")
    assert parity_error(model, spec, tmp_path / "model.onnx") < PARITY_TOLERANCE
    seen: list[int] = []

    def run_batch(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seen.append(batch.shape[1])
        return np.zeros((batch.shape[0], 1, *batch.shape[2:]), np.float32), np.zeros((batch.shape[0], 1), np.float32)

    prediction = predict_study(image.astype(np.float32), spec, run_batch)
    assert prediction.probability.shape == (5, 40, 40) and set(seen) == {9}  # every window got 9 channels
    assert evaluate_model(model, samples, spec).dice_studies == 1


def test_the_spec_asks_for_it_and_plans_without_it_read_as_2_d() -> None:
    base = load_task_spec()
    text = base.source_text.replace("[model]\n", "[model]\ncontext_slices = 1\n", 1)
    assert "context_slices = 1" in text
    assert parse_task_spec(text, "t").plan_overrides().context_slices == 1
    with pytest.raises(TaskSpecError, match="context_slices"):
        parse_task_spec(base.source_text.replace("[model]\n", "[model]\ncontext_slices = 5\n", 1), "t")
    plan = _spec(1).plan
    assert plan is not None
    data = json.loads(plan.to_json())
    del data["network"]["context_slices"]  # as an artifact exported before 2.5-D existed
    assert Plan.from_json(json.dumps(data)).network.context_slices == 0
