"""Robust aggregation and anomaly flags on controlled updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radfed.federation.learning.aggregation import AggregationRule, ServerOptimizer, SiteUpdate, aggregate


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


def test_server_momentum_carries_agreeing_steps_across_rounds(tmp_path: Path) -> None:
    from radfed.federation.coordinator.checkpoint import CoordinatorCheckpoint

    base = [np.zeros((2, 2), np.float32), np.ones(3, np.float32)]
    step = [np.full((2, 2), 0.1, np.float32), np.full(3, -0.1, np.float32)]

    def aggregated(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [a + s for a, s in zip(arrays, step, strict=True)]

    plain, velocity = ServerOptimizer().step(base, aggregated(base), None)
    assert all(np.allclose(p, a) for p, a in zip(plain, aggregated(base), strict=True))  # FedAvg as is
    assert velocity is None  # nothing to checkpoint
    momentum = ServerOptimizer(momentum=0.5)
    first, velocity = momentum.step(base, aggregated(base), None)
    # a checkpointed job resumes with the same velocity
    CoordinatorCheckpoint(completed_round=1, arrays=first, server_state=velocity).save(tmp_path)
    restored = CoordinatorCheckpoint.load(tmp_path)
    assert restored is not None and restored.server_state is not None and len(restored.arrays) == 2
    second, _ = momentum.step(restored.arrays, aggregated(restored.arrays), restored.server_state)
    # round 2 moves by its own step plus half of round 1's: 0.1 + 0.05
    assert np.allclose(second[0], 0.1 + 0.15) and np.allclose(second[1], 1 - 0.1 - 0.15)
    assert second[0].dtype == np.float32
    with pytest.raises(ValueError, match="momentum"):
        ServerOptimizer(momentum=1.0)


def test_a_server_learning_rate_scales_the_aggregated_step() -> None:
    base = [np.zeros((2, 2), np.float32), np.ones(3, np.float32)]
    aggregated = [np.full((2, 2), 0.1, np.float32), np.full(3, 0.9, np.float32)]
    doubled, velocity = ServerOptimizer(learning_rate=2.0).step(base, aggregated, None)
    assert np.allclose(doubled[0], 0.2) and np.allclose(doubled[1], 0.8)  # twice the step, from the global model
    assert velocity is None and doubled[0].dtype == np.float32


def test_fedadam_moves_each_coordinate_by_its_agreement_not_its_size(tmp_path: Path) -> None:
    """FedAdam / FedYogi (Reddi et al. 2021): a coordinate whose mean update keeps its sign moves by about the
    learning rate per round whether its update is large or 25 times smaller; one whose sign flips every round, or
    whose update is under the floor tau, barely moves. The moments survive a coordinator restart."""
    from radfed.federation.coordinator.checkpoint import CoordinatorCheckpoint
    from radfed.federation.learning.aggregation import ServerRule

    base = [np.zeros(5, np.float32), np.ones((2, 2), np.float32)]
    for rule in (ServerRule.ADAM, ServerRule.YOGI):
        server = ServerOptimizer(0.01, rule=rule)
        arrays, state = list(base), None
        for server_round in range(1, 21):
            # coordinates: large, smaller, flipping, zero, under tau; the matrix agrees, the other way
            flip = 1.0 if server_round % 2 else -1.0
            step = [np.array([0.5, 0.02, 0.5 * flip, 0.0, 1e-5]), np.full((2, 2), -0.2)]
            aggregated = [(a + s).astype(np.float32) for a, s in zip(arrays, step, strict=True)]
            arrays, state = server.step(arrays, aggregated, state)
            assert state is not None and len(state) == 5  # first moments, second moments, the round count
            if server_round == 10:
                CoordinatorCheckpoint(completed_round=10, arrays=arrays, server_state=state).save(tmp_path)
                restored = CoordinatorCheckpoint.load(tmp_path)
                assert restored is not None and restored.server_state is not None
                assert all(np.array_equal(a, b) for a, b in zip(restored.server_state, state, strict=True))
        moved = arrays[0] - base[0]
        assert 0.19 < moved[0] <= 0.2, (rule, moved)  # 20 rounds of about 0.01 (bias-corrected from round 1)
        assert moved[1] > 0.8 * moved[0], (rule, moved)
        assert abs(moved[2]) < 0.1 * moved[0] and moved[3] == 0.0 and 0 < moved[4] < 0.05 * moved[0], (rule, moved)
        assert np.allclose(arrays[1] - base[1], -moved[0], rtol=0.03) and arrays[1].dtype == np.float32
        first, _ = server.step(base, [(b + 1.0).astype(np.float32) for b in base], None)
        assert np.allclose(first[0], 0.01, rtol=0.02)  # round 1 already moves by the learning rate
    with pytest.raises(ValueError, match="step per coordinate"):
        ServerOptimizer(1.0, rule=ServerRule.ADAM)  # FedAvg's rate would move every weight by 1 a round
    with pytest.raises(ValueError, match="momentum"):
        ServerOptimizer(0.01, 0.9, ServerRule.YOGI)


def test_the_job_refuses_an_adaptive_server_optimiser_at_fedavgs_rate() -> None:
    from radfed.federation.job.run_config import RunConfig, RunConfigError
    from radfed.plugin.commands.cli import build_parser
    from radfed.plugin.commands.federation import run_config

    adam = RunConfig.from_run_config({"server-optimizer": "adam", "server-learning-rate": 0.01})
    assert adam.server_optimizer == "adam" and adam.server_learning_rate == 0.01
    with pytest.raises(RunConfigError, match="server-learning-rate"):
        RunConfig.from_run_config({"server-optimizer": "yogi"})  # the default rate, 1, is FedAvg's
    with pytest.raises(RunConfigError, match="server-optimizer"):
        RunConfig.from_run_config({"server-optimizer": "adagrad"})
    args = ["federation", "local", "--server-optimizer", "adam", "--server-learning-rate", "0.01"]
    assert run_config(build_parser().parse_args(args))["server-optimizer"] == "adam"


def test_the_job_and_the_command_line_default_to_the_measured_server_learning_rate() -> None:
    """The Flower app's run config (what a real job uses) and the experiments carry the same default; the local
    launcher passes a chosen rate through and otherwise leaves the app's."""
    import tomllib

    from radfed.federation.lab.experiments import Arm
    from radfed.federation.learning.aggregation import DEFAULT_SERVER_LEARNING_RATE
    from radfed.plugin.commands.cli import build_parser
    from radfed.plugin.commands.federation import run_config

    app = tomllib.loads((Path(__file__).parents[2] / "deploy/flower/pyproject.toml").read_text())
    # plain FedAvg: ahead of a server step of 2 in every real brain fold measured (README, Segmentation quality)
    assert app["tool"]["flwr"]["app"]["config"]["server-learning-rate"] == DEFAULT_SERVER_LEARNING_RATE == 1.0
    assert Arm("federated").server_learning_rate == DEFAULT_SERVER_LEARNING_RATE
    parser = build_parser()
    assert "server-learning-rate" not in run_config(parser.parse_args(["federation", "local"]))
    chosen = parser.parse_args(["federation", "local", "--server-learning-rate", "1"])
    assert run_config(chosen)["server-learning-rate"] == 1.0


def _partly_agreeing(rng: np.random.Generator, sites: int, size: int = 20_000) -> dict[str, np.ndarray]:
    """Deltas like real site updates: a shared direction plus each site's own, pairwise cosine about 0.3."""
    shared = rng.normal(size=size)
    return {f"site-{i}": 0.55 * shared + 0.84 * rng.normal(size=size) for i in range(1, sites + 1)}


@pytest.mark.parametrize("sites", [3, 4, 6])
def test_a_sign_flipped_site_is_flagged_among_partly_agreeing_honest_ones(sites: int) -> None:
    from radfed.federation.learning.aggregation import detect_anomalies

    for seed in range(5):
        deltas = _partly_agreeing(np.random.default_rng(seed), sites)
        honest = list(deltas.values())
        assert 0.2 < float(honest[0] @ honest[1] / np.linalg.norm(honest[0]) / np.linalg.norm(honest[1])) < 0.4
        assert detect_anomalies(deltas) == []  # no honest site is thrown away
        deltas["site-2"] = -deltas["site-2"]
        flags = detect_anomalies(deltas)
        assert [f.site for f in flags] == ["site-2"] and "direction" in flags[0].reason, flags


def _with_cosines(cosines: np.ndarray, norms: list[float], size: int = 5_000) -> dict[str, np.ndarray]:
    """Deltas with exactly these pairwise cosines and norms (Cholesky factor of the Gram matrix applied to
    orthonormal random directions)."""
    basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(size, len(norms))))
    vectors = basis @ np.linalg.cholesky(cosines).T * np.array(norms)
    return {f"site-{i + 1}": vectors[:, i] for i in range(len(norms))}


def test_an_honest_site_opposed_by_one_large_update_is_not_flagged() -> None:
    """Round 8 of a clean 3-site run (measured): site-3 opposed site-2's 2.5x larger update and was orthogonal
    to site-1's, so against the others' mean it scored -0.32; it was left out and the Dice fell from 0.74 to 0.34."""
    from radfed.federation.learning.aggregation import detect_anomalies

    cosines = np.array([[1.0, 0.163, -0.059], [0.163, 1.0, -0.339], [-0.059, -0.339, 1.0]])
    deltas = _with_cosines(cosines, [3.55, 8.79, 5.30])
    mean_of_others = (deltas["site-1"] + deltas["site-2"]) / 2
    score = deltas["site-3"] @ mean_of_others / np.linalg.norm(deltas["site-3"]) / np.linalg.norm(mean_of_others)
    assert score < -0.3  # what the mean-only rule flagged
    assert detect_anomalies(deltas) == []
    # the same site sign-flipped while it agreed with both others (0.3) is flagged
    agreeing = np.array([[1.0, 0.163, 0.3], [0.163, 1.0, 0.3], [0.3, 0.3, 1.0]])
    deltas = _with_cosines(agreeing, [3.55, 8.79, 5.30])
    deltas["site-3"] = -deltas["site-3"]
    assert [f.site for f in detect_anomalies(deltas)] == ["site-3"]


def test_the_direction_rule_rests_once_the_schedule_has_decayed() -> None:
    """Round 24 of 24 of a clean 3-site run (measured; cosine schedule, 10 local steps): updates 1/1000 of round
    1's, the third opposing both others (-0.21) while they agree (0.15). The direction rule flags it; with the
    rule off (the schedule's decayed tail) only the norm rule screens, which still catches a scaled update."""
    from radfed.federation.learning.aggregation import DIRECTION_MIN_LEARNING_RATE, detect_anomalies
    from radfed.federation.learning.training import direction_screened
    from radfed.inference.model.recipe import Schedule, TrainingRecipe

    cosines = np.array([[1.0, 0.15, -0.21], [0.15, 1.0, -0.21], [-0.21, -0.21, 1.0]])
    deltas = _with_cosines(cosines, [0.0044, 0.0068, 0.0040])
    assert [f.site for f in detect_anomalies(deltas)] == ["site-3"]
    assert detect_anomalies(deltas, direction=False) == []
    deltas["site-3"] = 20 * deltas["site-3"]
    assert [(f.site, str(f.rule)) for f in detect_anomalies(deltas, direction=False)] == [("site-3", "update-norm")]
    # which rounds the schedule leaves to the norm rule: cosine over 24 rounds x 10 steps, the last 3
    cosine = TrainingRecipe(schedule=Schedule.COSINE)
    screened = [direction_screened(cosine, r, 24, 10) for r in range(1, 25)]
    assert screened == [True] * 21 + [False] * 3
    assert 0.5 * (1 + np.cos(np.pi * 210 / 240)) < DIRECTION_MIN_LEARNING_RATE <= 0.5 * (1 + np.cos(np.pi * 200 / 240))
    poly = TrainingRecipe(schedule=Schedule.POLY)
    assert sum(not direction_screened(poly, r, 100, 10) for r in range(1, 101)) == 3  # (1 - t) ** 0.9 < 0.05
    constant = TrainingRecipe(schedule=Schedule.CONSTANT)
    assert all(direction_screened(constant, r, 24, 10) for r in range(1, 25))
    # a one-round job, and rounds still warming up, are screened whatever the factor
    assert direction_screened(cosine, 1, 1, 10)
    warm = TrainingRecipe(schedule=Schedule.COSINE, warmup_steps=50)
    assert direction_screened(warm, 1, 24, 10) and direction_screened(warm, 5, 24, 10)
