"""Robust aggregation and anomaly flags on controlled updates."""

from __future__ import annotations

import numpy as np
import pytest

from radfed.federation.aggregation import AggregationRule, SiteUpdate, aggregate


def _honest(rng: np.random.Generator, base: list[np.ndarray], step: list[np.ndarray], n: int) -> list[SiteUpdate]:
    return [
        SiteUpdate(f"site-{i}", [b + s + rng.normal(0, 0.01, b.shape) for b, s in zip(base, step, strict=True)], 10)
        for i in range(1, n + 1)
    ]


@pytest.fixture
def setting() -> tuple[list[np.ndarray], list[np.ndarray], np.random.Generator]:
    rng = np.random.default_rng(0)
    base = [rng.normal(size=(4, 3)), rng.normal(size=(5,))]
    step = [np.full((4, 3), 0.1), np.full((5,), -0.1)]
    return base, step, rng


@pytest.mark.parametrize("rule", list(AggregationRule))
def test_honest_sites_move_the_model_by_their_step(setting: tuple, rule: AggregationRule) -> None:  # type: ignore[type-arg]
    base, step, rng = setting
    outcome = aggregate(base, _honest(rng, base, step, 5), rule)
    assert outcome.flags == ()
    for new, b, s in zip(outcome.arrays, base, step, strict=True):
        assert np.abs(new - (b + s)).max() < 0.03


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
@pytest.mark.parametrize("rule", list(AggregationRule))
def test_attacker_is_flagged_named_and_left_out(setting: tuple, attack: str, rule: AggregationRule) -> None:  # type: ignore[type-arg]
    base, step, rng = setting
    updates = _honest(rng, base, step, 4)
    factor = 50.0 if attack == "scaled" else -1.0
    updates.append(SiteUpdate("site-evil", [b + factor * s for b, s in zip(base, step, strict=True)], 10))
    outcome = aggregate(base, updates, rule)
    assert [f.site for f in outcome.flags] == ["site-evil"]
    assert "site-evil" not in outcome.used
    reason = outcome.flags[0].reason
    assert ("norm" in reason) if attack == "scaled" else ("cosine" in reason)
    for new, b, s in zip(outcome.arrays, base, step, strict=True):
        assert np.abs(new - (b + s)).max() < 0.03


def test_fedavg_weights_by_studies() -> None:
    base = [np.zeros(2)]
    updates = [SiteUpdate("a", [np.array([1.0, 1.0])], 1), SiteUpdate("b", [np.array([4.0, 4.0])], 3)]
    outcome = aggregate(base, updates, "fedavg")
    np.testing.assert_allclose(outcome.arrays[0], [3.25, 3.25])
