"""Late updates (issue 19 item 5): the staleness weight and the rebasing of a late site model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from radfed.federation.learning.aggregation import AggregationRule, SiteUpdate, aggregate
from radfed.federation.learning.staleness import rebase, staleness_weight


def test_the_weight_falls_with_staleness_and_is_the_examples_when_fresh() -> None:
    weights = [staleness_weight(40, s, 0.5) for s in range(5)]
    assert weights[0] == 40
    assert all(a > b for a, b in itertools.pairwise(weights))
    assert weights[3] == pytest.approx(40 / 2)  # (1 + 3) ** -0.5
    assert staleness_weight(40, 7, 0.0) == 40  # exponent 0: no discount
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(40, -1, 0.5)


def test_a_late_model_brings_its_own_step_onto_the_current_model() -> None:
    rng = np.random.default_rng(0)
    origin = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
    step = [rng.normal(size=a.shape).astype(np.float32) for a in origin]
    current = [rng.normal(size=a.shape).astype(np.float32) for a in origin]
    late = [o + s for o, s in zip(origin, step, strict=True)]
    moved = rebase(late, origin, current)
    for m, c, s in zip(moved, current, step, strict=True):
        assert m.dtype == np.float32
        np.testing.assert_allclose(m - c, s, atol=1e-5)
    with pytest.raises(ValueError, match="late arrays"):
        rebase(late[:1], origin, current)


def test_fedavg_counts_a_folded_update_by_its_discounted_weight() -> None:
    base = [np.zeros(4, dtype=np.float32)]
    fresh = [SiteUpdate(f"s{i}", [np.full(4, float(i + 1), dtype=np.float32)], 10) for i in range(2)]
    late = SiteUpdate("s2", [np.full(4, 10.0, dtype=np.float32)], staleness_weight(10, 3, 0.5))  # weight 5
    outcome = aggregate(base, [*fresh, late], AggregationRule.FEDAVG)
    expected = (10 * 1 + 10 * 2 + 5 * 10) / 25
    np.testing.assert_allclose(outcome.arrays[0], np.full(4, expected), rtol=1e-6)
