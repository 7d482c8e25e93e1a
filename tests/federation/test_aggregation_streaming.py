"""The coordinator's large-N path: streaming FedAvg / multi-Krum and the sketched O(N) screening, against the
batch rules and the exact pairwise screening on constructed updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radfed.federation.learning.aggregation import (
    EXACT_UP_TO_SITES,
    AnomalyRule,
    CountSketch,
    NothingToAggregateError,
    Screening,
    SiteUpdate,
    aggregate,
    detect_anomalies,
    detect_anomalies_sketched,
    flatten,
)
from radfed.federation.learning.streaming import StreamingAggregator

SHAPES = [(6, 5, 3, 3), (6,), (1, 6, 1, 1), (1,)]  # a conv, its bias, a head: like a model's arrays


def _model(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _partly_agreeing(rng: np.random.Generator, sites: int, size: int = 20_000) -> dict[str, np.ndarray]:
    """Deltas with a shared direction plus each site's own: pairwise cosine about 0.3, as measured on real ones."""
    shared = rng.normal(size=size)
    return {f"site-{i:03d}": 0.55 * shared + 0.84 * rng.normal(size=size) for i in range(1, sites + 1)}


def _sketched(deltas: dict[str, np.ndarray]) -> list[str]:
    sketch = CountSketch(len(next(iter(deltas.values()))))
    norms = {n: float(np.linalg.norm(d)) for n, d in deltas.items()}
    return sorted(f.site for f in detect_anomalies_sketched(norms, {n: sketch(d) for n, d in deltas.items()}))


def _exact(deltas: dict[str, np.ndarray]) -> list[str]:
    return sorted(f.site for f in detect_anomalies(deltas))


@pytest.mark.parametrize("sites", [3, 4, 6, 40])
@pytest.mark.parametrize("attack", ["sign-flipped", "scaled"])
def test_the_sketched_screening_flags_the_attacker_the_pairwise_one_flags(sites: int, attack: str) -> None:
    for seed in range(3 if sites < 10 else 1):
        deltas = _partly_agreeing(np.random.default_rng(seed), sites, 20_000 if sites < 10 else 5_000)
        assert _sketched(deltas) == _exact(deltas) == []  # no honest site is thrown away
        deltas["site-002"] = -deltas["site-002"] if attack == "sign-flipped" else 20 * deltas["site-002"]
        assert _sketched(deltas) == _exact(deltas) == ["site-002"]


def test_many_sites_with_several_attackers_get_the_same_flags_from_both_rules() -> None:
    deltas = _partly_agreeing(np.random.default_rng(7), 120, 5_000)
    for name in ("site-010", "site-050", "site-090"):
        deltas[name] = -deltas[name]
    deltas["site-100"] = 20 * deltas["site-100"]
    expected = ["site-010", "site-050", "site-090", "site-100"]
    assert _exact(deltas) == expected
    assert _sketched(deltas) == expected


def test_an_honest_site_opposed_by_one_large_update_is_not_flagged_by_the_sketched_rule() -> None:
    """Round 8 of a clean 3-site run (see test_aggregation): against the others' mean site-3 scores -0.32, but it
    opposes only one of the two others one by one, so neither rule flags it; sign-flipped it is flagged."""
    cosines = np.array([[1.0, 0.163, -0.059], [0.163, 1.0, -0.339], [-0.059, -0.339, 1.0]])
    basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(5_000, 3)))
    vectors = basis @ np.linalg.cholesky(cosines).T * np.array([3.55, 8.79, 5.30])
    deltas = {f"site-{i + 1}": vectors[:, i] for i in range(3)}
    assert _sketched(deltas) == _exact(deltas) == []
    agreeing = np.array([[1.0, 0.163, 0.3], [0.163, 1.0, 0.3], [0.3, 0.3, 1.0]])
    vectors = basis @ np.linalg.cholesky(agreeing).T * np.array([3.55, 8.79, 5.30])
    deltas = {f"site-{i + 1}": vectors[:, i] for i in range(3)}
    deltas["site-3"] = -deltas["site-3"]
    assert _sketched(deltas) == _exact(deltas) == ["site-3"]


def test_a_count_sketch_keeps_cosines_within_a_few_hundredths() -> None:
    rng = np.random.default_rng(1)
    sketch = CountSketch(200_000)
    a = rng.normal(size=200_000)
    for rho in (-0.5, 0.0, 0.3, 0.9):
        b = rho * a + np.sqrt(1 - rho**2) * rng.normal(size=200_000)
        sa, sb = sketch(a), sketch(b)
        assert abs(sa @ sb / np.linalg.norm(sa) / np.linalg.norm(sb) - rho) < 0.06
    np.testing.assert_allclose(sketch(a + 2 * a), 3 * sketch(a))  # linear


def _updates(sites: int, attackers: dict[str, float], seed: int = 0) -> tuple[list[np.ndarray], list[SiteUpdate]]:
    rng = np.random.default_rng(seed)
    base = _model(rng)
    size = flatten(base).size
    deltas = _partly_agreeing(rng, sites, size)
    updates = []
    for i, (name, delta) in enumerate(deltas.items()):
        delta = attackers.get(name, 1.0) * 0.01 * delta
        arrays, start = [], 0
        for b in base:
            arrays.append((b + delta[start : start + b.size].reshape(b.shape)).astype(np.float32))
            start += b.size
        updates.append(SiteUpdate(name, arrays, 3 + i % 5))
    return base, updates


def _stream(base: list[np.ndarray], updates: list[SiteUpdate], rule: str, tmp_path: Path, screen: bool = True):  # type: ignore[no-untyped-def]
    with StreamingAggregator(base, rule, screen=screen, spill_root=tmp_path) as stream:
        for update in reversed(updates):  # another arrival order than the batch's
            stream.add(update)
        return stream.outcome()


@pytest.mark.parametrize("screen", [True, False])
def test_streaming_fedavg_equals_the_batch_fedavg(tmp_path: Path, screen: bool) -> None:
    base, updates = _updates(12, {"site-003": -1.0, "site-007": 20.0})
    batch = aggregate(base, updates, "fedavg", screen=screen, screening="exact")
    streamed = _stream(base, updates, "fedavg", tmp_path, screen)
    assert sorted(f.site for f in streamed.flags) == sorted(f.site for f in batch.flags)
    assert sorted(f.site for f in batch.flags) == (["site-003", "site-007"] if screen else [])
    assert sorted(streamed.used) == sorted(batch.used)
    for s, b in zip(streamed.arrays, batch.arrays, strict=True):
        assert s.dtype == b.dtype == np.float32
        np.testing.assert_allclose(s, b, rtol=1e-6, atol=1e-7)
    assert list(tmp_path.iterdir()) == []  # the spill folder went with the aggregator


def test_streaming_multi_krum_equals_the_batch_multi_krum(tmp_path: Path) -> None:
    """site-005's update is 3x an honest one: below the norm flag, but the farthest from the others, so multi-Krum
    (f = 1) leaves it out whether distances come from sketches or from the full updates."""
    base, updates = _updates(12, {"site-003": -1.0, "site-007": 20.0, "site-005": 3.0})
    streamed = _stream(base, updates, "multi-krum", tmp_path)
    for screening in ("sketch", "exact"):
        batch = aggregate(base, updates, "multi-krum", screening=screening)
        assert sorted(f.site for f in batch.flags) == ["site-003", "site-007"]
        for s, b in zip(streamed.arrays, batch.arrays, strict=True):
            np.testing.assert_allclose(s, b, rtol=1e-6, atol=1e-7)
    assert sorted(f.site for f in streamed.flags) == ["site-003", "site-007"]
    with_005 = aggregate(base, [u for u in updates if u.site != "site-012"], "multi-krum", krum_f=0)
    assert np.abs(flatten(with_005.arrays) - flatten(streamed.arrays)).max() > 1e-3  # site-005 would have counted


def test_streaming_fedavg_without_screening_writes_nothing_to_disk(tmp_path: Path) -> None:
    base, updates = _updates(4, {})
    with StreamingAggregator(base, "fedavg", screen=False, spill_root=tmp_path) as stream:
        stream.add(updates[0])
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(ValueError, match="already added"):
            stream.add(updates[0])


def test_the_median_does_not_stream() -> None:
    base, _ = _updates(3, {})
    assert not StreamingAggregator.streams("median", Screening.SKETCH)
    assert not StreamingAggregator.streams("fedavg", Screening.EXACT)
    with pytest.raises(ValueError, match="every update at once"):
        StreamingAggregator(base, "trimmed-mean")


def test_auto_screening_is_exact_up_to_the_site_count_and_sketched_above() -> None:
    assert Screening.AUTO.resolve(EXACT_UP_TO_SITES) is Screening.EXACT
    assert Screening.AUTO.resolve(EXACT_UP_TO_SITES + 1) is Screening.SKETCH
    assert Screening.EXACT.resolve(1000) is Screening.EXACT
    base, updates = _updates(EXACT_UP_TO_SITES + 1, {"site-002": -1.0})
    flags = aggregate(base, updates, "median").flags
    assert [f.site for f in flags] == ["site-002"] and "sketched" in flags[0].reason
    flags = aggregate(base, updates[:EXACT_UP_TO_SITES], "median").flags
    assert [f.site for f in flags] == ["site-002"] and "sketched" not in flags[0].reason


def _equally_opposed(sites: int, cosine: float, size: int = 5_000) -> dict[str, np.ndarray]:
    """Deltas whose every pair has this cosine (Cholesky factor of the Gram matrix on orthonormal directions)."""
    gram = np.full((sites, sites), cosine) + (1 - cosine) * np.eye(sites)
    basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(size, sites)))
    vectors = basis @ np.linalg.cholesky(gram).T
    return {f"site-{i + 1}": vectors[:, i] * (1 + 0.1 * i) for i in range(sites)}


@pytest.mark.parametrize("sites", [3, 4, 6])
def test_updates_that_all_oppose_each_other_are_averaged_not_all_flagged(sites: int) -> None:
    """Four real-brain hospitals at four times the recipe's learning rate: every update opposed the others, the
    direction rule flagged all of them and the round had nothing to average. With no direction most updates share
    there is nothing to screen against: the rule abstains. Flags stay for a minority only."""
    deltas = _equally_opposed(sites, -0.9 / (sites - 1))  # as opposed as that many vectors can be to each other
    assert _exact(deltas) == _sketched(deltas) == []
    base = [np.zeros(5_000, dtype=np.float32)]
    updates = [SiteUpdate(name, [d.astype(np.float32)], 1.0) for name, d in deltas.items()]
    assert sorted(aggregate(base, updates).used) == sorted(deltas)
    # the boundary: a sign-flipped minority is flagged, half the sites flipped is beyond a majority's screening
    deltas = _partly_agreeing(np.random.default_rng(2), 4)
    deltas["site-002"] = -deltas["site-002"]
    assert _exact(deltas) == _sketched(deltas) == ["site-002"]
    deltas["site-004"] = -deltas["site-004"]
    assert _exact(deltas) == _sketched(deltas) == []


@pytest.mark.parametrize("screen", [True, False])
def test_a_non_finite_update_is_flagged_and_never_reaches_the_sum(tmp_path: Path, screen: bool) -> None:
    """A NaN or an infinity anywhere in an update: flagged ``update-not-finite`` and left out by the batch rules,
    the sketched and exact screening and the streaming sum (where, once added, it could not be taken out again:
    NaN - NaN is NaN), screening on or off; the model is the FedAvg of the others."""
    base, updates = _updates(8, {})
    updates[2].arrays[1][0] = np.nan
    updates[5].arrays[0][0, 0, 0, 0] = np.inf
    finite = [u for u in updates if u.site not in ("site-003", "site-006")]
    expected = aggregate(base, finite, "fedavg", screen=False)
    for outcome in (
        aggregate(base, updates, "fedavg", screen=screen, screening="exact"),
        aggregate(base, updates, "fedavg", screen=screen, screening="sketch"),
        aggregate(base, updates, "median", screen=screen),
        _stream(base, updates, "fedavg", tmp_path, screen),
    ):
        assert sorted((f.site, f.rule) for f in outcome.flags) == [
            ("site-003", AnomalyRule.UPDATE_NOT_FINITE),
            ("site-006", AnomalyRule.UPDATE_NOT_FINITE),
        ]
        assert all(np.isfinite(a).all() for a in outcome.arrays)
        assert sorted(outcome.used) == sorted(u.site for u in finite)
    for s, e in zip(_stream(base, updates, "fedavg", tmp_path, screen).arrays, expected.arrays, strict=True):
        np.testing.assert_allclose(s, e, rtol=1e-6, atol=1e-7)
    # two sites, too few for the norm and direction rules, are still screened for this
    assert [f.site for f in aggregate(base, updates[1:3]).flags] == ["site-003"]


def test_a_round_whose_every_update_is_not_finite_says_so(tmp_path: Path) -> None:
    base, updates = _updates(3, {})
    for update in updates:
        update.arrays[3][0] = np.nan
    reason = r"no update left to aggregate: site-001: update not finite .*; site-002: .*; site-003: "
    with pytest.raises(NothingToAggregateError, match=reason):
        aggregate(base, updates)
    with pytest.raises(NothingToAggregateError, match=reason):
        _stream(base, updates, "fedavg", tmp_path)  # added in the reverse order
