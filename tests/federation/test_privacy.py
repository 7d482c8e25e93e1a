"""DP-SGD at a site: the budget adds up across rounds and processes, and a site refuses to overspend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from radfed.federation.learning.cohort import TrainingSample, cohort_from_sources
from radfed.federation.learning.networks import TrainableScope, scope_parameters
from radfed.federation.learning.privacy import (
    PrivacyBudgetExceededError,
    PrivacySettings,
    epsilon_spent,
    load_accountant_state,
    train_private,
)
from radfed.federation.learning.training import TrainingSettings, new_model
from radfed.inference.model.taskspec import TaskSpec, load_task_spec


@pytest.fixture(scope="module")
def samples(synth_root: Path) -> list[TrainingSample]:
    return cohort_from_sources(load_task_spec(), [str(synth_root)]).samples


@pytest.fixture(scope="module")
def spec(planned_spec: TaskSpec) -> TaskSpec:
    return planned_spec


def _settings(spec: TaskSpec) -> TrainingSettings:
    return TrainingSettings.from_spec(spec, steps=2, batch_size=2)


def test_budget_adds_up_across_rounds_and_is_persisted(
    tmp_path: Path, samples: list[TrainingSample], spec: TaskSpec
) -> None:
    privacy = PrivacySettings(epsilon=4.0, delta=1e-5, planned_steps=6)
    state_file = tmp_path / "accountant.json"
    model = new_model(spec)
    before = [p.detach().clone() for p in model.parameters()]
    spent = []
    for _ in range(3):
        _log, epsilon = train_private(model, samples, spec, _settings(spec), privacy, state_file, steps=2)
        spent.append(epsilon)
    assert spent[0] < spent[1] < spent[2] <= privacy.epsilon
    assert spent[2] > 0.8 * privacy.epsilon  # the noise was calibrated to spend the budget over the job
    history = json.loads(state_file.read_text())["history"]
    assert sum(step[2] for step in history) == 6
    # Three rounds of 2 steps cost what one round of 6 steps costs (RDP composes exactly).
    one_go = {"history": [[history[0][0], history[0][1], 6]]}
    assert epsilon_spent(load_accountant_state(state_file), 1e-5) == pytest.approx(
        epsilon_spent(one_go, 1e-5), rel=1e-9
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_site_refuses_to_overspend(tmp_path: Path, samples: list[TrainingSample], spec: TaskSpec) -> None:
    privacy = PrivacySettings(epsilon=2.0, delta=1e-5, planned_steps=2)
    state_file = tmp_path / "accountant.json"
    model = new_model(spec)
    train_private(model, samples, spec, _settings(spec), privacy, state_file, steps=2)
    saved = state_file.read_text()
    with pytest.raises(PrivacyBudgetExceededError, match="refusing to train") as info:
        train_private(model, samples, spec, _settings(spec), privacy, state_file, steps=2)
    assert "budget is 2.00" in str(info.value)
    assert state_file.read_text() == saved  # nothing was spent


def test_settings_need_a_calibration() -> None:
    with pytest.raises(ValueError, match="planned_steps"):
        PrivacySettings(epsilon=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        PrivacySettings(epsilon=0.0, delta=1e-5, planned_steps=1)


def test_dp_sgd_on_the_norms_scope_changes_only_those_parameters(
    tmp_path: Path, samples: list[TrainingSample], spec: TaskSpec
) -> None:
    privacy = PrivacySettings(epsilon=8.0, delta=1e-5, planned_steps=2, trainable=TrainableScope.NORMS)
    model = new_model(spec)
    scope = {id(p) for p in scope_parameters(model, TrainableScope.NORMS)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_private(model, samples, spec, _settings(spec), privacy, tmp_path / "accountant.json", steps=2)
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    in_scope = {name for name, p in model.named_parameters() if id(p) in scope}
    assert len(in_scope) < len(before)
    assert changed == in_scope  # every step noises every trained parameter, and nothing else moved
    assert all(p.requires_grad for p in model.parameters())  # the next round (or a plain training) trains all
