"""A run that would overrun its time limit is shortened with its schedule, so it ends decayed, not cut off;
a recipe without steps fills its time limit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.networks import build_network
from radfed.federation.learning.training import FILL_STEPS_CAP, TrainingLog, TrainingSettings, train_local
from radfed.inference.model.taskspec import TaskSpec, load_task_spec
from tests.small_model import small_spec


def _small_task(time_limit_minutes: float) -> tuple[TaskSpec, list[TrainingSample]]:
    spec = small_spec()
    training = replace(spec.training, time_limit_minutes=time_limit_minutes, augmentations=(), warmup_steps=0)
    spec = replace(spec, training=training)
    rng = np.random.default_rng(0)
    samples = []
    for n in range(3):
        lesions = np.zeros((4, 48, 48), np.uint8)
        lesions[1:3, 10:20, 10:20] = 1
        image = rng.normal(size=(3, 4, 48, 48)).astype(np.float16) + lesions
        samples.append(TrainingSample(f"s{n}", image, lesions, n % 2, voxel_mm3=3.0))
    return spec, samples


def _train(spec: TaskSpec, samples: list[TrainingSample], steps: int | None) -> TrainingLog:
    assert spec.plan is not None
    model = build_network(spec.plan.network, len(spec.channels))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recipe's default; more threads than free cores crawl on a shared machine
    try:
        return train_local(model, samples, spec, TrainingSettings.from_spec(spec, steps=steps))
    finally:
        torch.set_num_threads(threads)


def test_a_time_limited_run_is_shortened_and_still_ends_with_a_decayed_learning_rate() -> None:
    spec, samples = _small_task(0.5)
    log = _train(spec, samples, 1_000_000)
    assert log.fitted_steps is not None and log.steps == log.fitted_steps < 1_000_000
    assert not log.stopped_by_time_limit
    assert log.seconds < 0.5 * 60 + 10  # within the limit (plus the final checkpoint)
    assert log.optimizer_state is not None
    final_rate = log.optimizer_state["param_groups"][0]["lr"]
    assert final_rate < 0.05 * spec.training.learning_rate  # the cosine schedule ran to its end


def test_a_recipe_without_steps_fills_its_time_limit_and_ends_decayed() -> None:
    spec, samples = _small_task(0.25)
    assert spec.training.steps is None  # the shipped default leaves it to the time limit
    settings = TrainingSettings.from_spec(spec)
    assert settings.fill_time_limit and settings.steps == FILL_STEPS_CAP
    assert not TrainingSettings.from_spec(spec, steps=7).fill_time_limit  # an explicit count is a count
    log = _train(spec, samples, None)
    assert log.fitted_steps is not None and log.steps == log.fitted_steps
    assert not log.stopped_by_time_limit
    assert 0.5 * 15 < log.seconds < 15 + 10  # most of the budget used, and no more
    assert log.optimizer_state is not None
    assert log.optimizer_state["param_groups"][0]["lr"] < 0.05 * spec.training.learning_rate


def test_validation_passes_take_at_most_the_recipes_share_of_the_run() -> None:
    """A slow validation pass (here 0.3 s against steps of a few ms) is run less often than validate_every
    says, so that checkpoint selection does not eat the training budget."""
    import time

    spec, samples = _small_task(0.0)
    spec = replace(spec, training=replace(spec.training, validate_every=5, validation_share=0.2))
    assert spec.plan is not None
    model = build_network(spec.plan.network, len(spec.channels))
    scores = iter(range(1000))

    def validate(_: torch.nn.Module) -> float:
        time.sleep(0.3)
        return float(next(scores))

    log = train_local(model, samples, spec, TrainingSettings.from_spec(spec, steps=200), validate=validate)
    passes = [step for step, _ in log.validation]
    assert passes[0] == 5 and passes[-1] == 200  # the first after validate_every, the last at the end
    assert len(passes) < 200 // 5 / 2  # unbounded: 40 passes
    assert log.validation_seconds <= 0.2 * log.seconds + 2 * 0.3  # the share, plus the first and last pass
    assert log.best_step == 200  # the scores rise: the last checkpoint is kept


def test_validation_interval_follows_the_cost_of_a_pass() -> None:
    from radfed.federation.learning.training import validation_interval

    recipe = replace(load_task_spec().training, validate_every=250, validation_share=0.1)
    log = TrainingLog(steps=250, validation=[(250, 0.5)], validation_seconds=90.0)
    # 250 steps took 100 s of training (0.4 s each); a pass costs 90 s: every 2025 steps keeps it at 10 %
    assert validation_interval(recipe, log, elapsed=190.0) == 2025
    cheap = TrainingLog(steps=250, validation=[(250, 0.5)], validation_seconds=1.0)
    assert validation_interval(recipe, cheap, elapsed=101.0) == 250  # never more often than validate_every
