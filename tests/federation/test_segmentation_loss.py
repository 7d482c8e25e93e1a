"""The segmentation loss's Dice term (``[training] dice_over``): over the whole batch, or per patch holding lesion
voxels. The per-patch loss is a mean of per-patch terms, which DP-SGD's per-study clipping needs, and DP jobs use
it whatever the spec says."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from radfed.federation.learning import privacy
from radfed.federation.learning.cohort import TrainingSample, cohort_from_sources
from radfed.federation.learning.privacy import PrivacySettings, train_private
from radfed.federation.learning.training import PatchSampler, TrainingSettings, loss_fn, new_model
from radfed.inference.model.recipe import DiceOver, TrainingRecipe
from radfed.inference.model.taskspec import TaskSpec, TaskSpecError, load_task_spec, parse_task_spec


@pytest.fixture(scope="module")
def samples(synth_root: Path) -> list[TrainingSample]:
    return cohort_from_sources(load_task_spec(), [str(synth_root)]).samples


@pytest.fixture(scope="module")
def batch(planned_spec: TaskSpec, samples: list[TrainingSample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three patches: a large lesion, none, a small lesion; labels positive, negative and unknown."""
    images, masks, _ = PatchSampler(planned_spec, planned_spec.training, seed=0).batch(samples, 3)
    masks = torch.zeros_like(masks)
    masks[0, ..., 10:40, 10:40] = 1
    masks[2, ..., 20:24, 30:33] = 1
    return images, masks, torch.tensor([[1.0], [0.0], [-1.0]])


def _losses(spec: TaskSpec, recipe: TrainingRecipe, batch: tuple[torch.Tensor, ...]) -> tuple[float, list[float]]:
    """The loss of the whole batch and of each patch alone, under one model in training mode."""
    model = new_model(spec, seed=0)
    model.train()
    images, masks, targets = batch
    with torch.no_grad():
        whole = float(loss_fn(model, images, masks, targets, recipe))
        alone = [
            float(loss_fn(model, images[i : i + 1], masks[i : i + 1], targets[i : i + 1], recipe))
            for i in range(images.shape[0])
        ]
    return whole, alone


def test_per_patch_loss_is_the_mean_of_each_patch_alone(planned_spec: TaskSpec, batch: Any) -> None:
    recipe = replace(planned_spec.training, dice_over=DiceOver.PATCH)
    whole, alone = _losses(planned_spec, recipe, batch)
    assert whole == pytest.approx(sum(alone) / len(alone), rel=1e-5)
    # the batch Dice couples the patches: the same check fails there
    whole, alone = _losses(planned_spec, replace(recipe, dice_over=DiceOver.BATCH), batch)
    assert abs(whole - sum(alone) / len(alone)) > 1e-3


def test_a_patch_without_lesion_gets_no_dice_term(planned_spec: TaskSpec, batch: Any) -> None:
    dice_only = replace(planned_spec.training, dice_over=DiceOver.PATCH, ce_weight=0.0, classification_weight=0.0)
    _, alone = _losses(planned_spec, dice_only, batch)
    assert alone[1] == 0.0
    assert alone[0] > 0.1 and alone[2] > 0.1


def test_dice_over_is_read_from_the_spec() -> None:
    text = load_task_spec().source_text
    assert load_task_spec().training.dice_over is DiceOver.BATCH  # the default
    chosen = parse_task_spec(text.replace("[training]\n", '[training]\ndice_over = "patch"\n'), "t")
    assert chosen.training.dice_over is DiceOver.PATCH
    with pytest.raises(TaskSpecError, match="dice_over"):
        parse_task_spec(text.replace("[training]\n", '[training]\ndice_over = "voxel"\n'), "t")


def test_dp_sgd_takes_the_per_patch_loss_whatever_the_spec_says(
    tmp_path: Path, planned_spec: TaskSpec, samples: list[TrainingSample], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[DiceOver] = []

    def observed(*args: Any) -> torch.Tensor:
        seen.append(args[4].dice_over)
        return loss_fn(*args)

    monkeypatch.setattr(privacy, "loss_fn", observed)
    spec = replace(planned_spec, training=replace(planned_spec.training, dice_over=DiceOver.BATCH))
    settings = TrainingSettings.from_spec(spec, steps=3, batch_size=2)
    model = new_model(spec, seed=0)
    budget = PrivacySettings(epsilon=8.0, delta=1e-5, planned_steps=3)
    train_private(model, samples, spec, settings, budget, tmp_path / "accountant.json", steps=3)
    assert seen and set(seen) == {DiceOver.PATCH}
