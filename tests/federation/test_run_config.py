"""Every run-config key has one default, the Flower app declares the same ones, and every key an operator sets
reaches the site unchanged (through the ServerApp's round config, Flower's wire format, the ClientApp and the
site worker's frame)."""

from __future__ import annotations

import tomllib
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp import Grid

from radfed.federation.coordinator.checkpoint import CoordinatorCheckpoint
from radfed.federation.coordinator.server_app import RoundDriver
from radfed.federation.job.alerts import PoisoningAlert
from radfed.federation.job.run_config import RoundConfig, RunConfig, RunConfigError
from radfed.federation.learning.aggregation import AggregationRule, AnomalyRule, Screening
from radfed.federation.learning.membership import MembershipAudit
from radfed.federation.learning.networks import TrainableScope
from radfed.federation.learning.staleness import LateUpdates
from radfed.federation.site import client_app
from radfed.federation.site import worker as site_worker
from radfed.federation.site.rounds import RoundPlan
from radfed.inference.model.taskspec import Outputs, load_task_spec

APP = Path(__file__).parents[2] / "deploy" / "flower" / "pyproject.toml"


@pytest.fixture(scope="module")
def app_config() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads(APP.read_text())["tool"]["flwr"]["app"]["config"]
    return config


def site_plan(
    run: RunConfig, server_round: int, state: CoordinatorCheckpoint, out_dir: Path, outputs: Outputs | None = None
) -> RoundPlan:
    """What the site parses from the config the ServerApp sends for ``server_round``."""
    job = RoundDriver(cast(Grid, None), replace(run, out_dir=str(out_dir)))
    sent = RecordDict({"config": job.config(server_round, state, outputs)})
    wire = ProtoRecordDict.FromString(recorddict_to_proto(sent).SerializeToString())
    message = cast(Message, SimpleNamespace(content=recorddict_from_proto(wire)))  # what _config reads
    frame = site_worker.unpack(site_worker.pack(site_worker.Frame({"config": client_app._config(message)}, [])))
    return RoundPlan.from_config(frame.header["config"])


def every_key_changed(out_dir: Path) -> RunConfig:
    run = RunConfig(
        num_server_rounds=7,
        local_steps=4,
        min_sites=3,
        epsilon=2.5,
        delta=1e-6,
        max_grad_norm=0.5,
        trainable=TrainableScope.NORMS,
        task="prostate-lesions",
        job="job-under-test",
        out_dir=str(out_dir),
        model_version="2.1.0",
        round_timeout=45.5,
        aggregation=AggregationRule.MULTI_KRUM,
        screening=Screening.SKETCH,
        server_momentum=0.9,
        server_learning_rate=1.5,
        proximal_mu=0.01,
        harmonise=False,
        held_out_fraction=0.4,
        round_attempts=5,
        round_quorum=4,
        round_deadline=30.0,
        late_updates=LateUpdates.FOLD,
        staleness_exponent=1.0,
        sites_per_round=6,
        simulation_root="/sim",
        rollout=False,
        seed=11,
        base_model="/srv/base-model",
        learning_rate=3e-4,
        compression="topk:0.05",
        anonymise_alerts=True,
        membership_audit=MembershipAudit.LIRA,
        membership_references=6,
        membership_steps=12,
        bias_min_cell=3,
        calibration_min_studies=4,
        evaluation_min_studies=3,
        update_clip_norm=2.5,
        secure_aggregation_threshold=0.8,
        secure_aggregation_shares=5,
    )
    default = RunConfig()
    # secure-aggregation excludes multi-krum, compression and early-closing rounds: its own test below; an adaptive
    # server-optimizer excludes server momentum and FedAvg's rates (test_aggregation.py)
    unchanged = [f.name for f in fields(run) if getattr(run, f.name) == getattr(default, f.name)]
    assert unchanged == ["server_optimizer", "secure_aggregation"]
    return run


def test_the_flower_app_declares_every_key_with_its_default(app_config: dict[str, Any]) -> None:
    assert list(app_config) == list(RunConfig.keys())
    assert RunConfig.from_run_config(app_config) == RunConfig()
    defaults = RunConfig().to_record()
    assert {k: type(v) for k, v in app_config.items()} == {k: type(v) for k, v in defaults.items()}


def test_every_key_reaches_the_site(tmp_path: Path) -> None:
    run = every_key_changed(tmp_path / "job")
    flags = [PoisoningAlert(run.job, 2, "hospital-3", AnomalyRule.UPDATE_NORM)]
    state = CoordinatorCheckpoint(
        plan='{"patch": [1, 2, 3]}', harmonisation={"t2w": [0.0, 1.5, 9.0]}, flags=flags, job_instance="9f2c41d07e"
    )
    plan = site_plan(run, 4, state, tmp_path / "job")
    assert plan.run == run
    assert (plan.server_round, plan.plan, plan.harmonisation) == (4, state.plan, state.harmonisation)
    assert plan.job_instance == "9f2c41d07e"
    state.save(tmp_path)  # a resumed job sends the same instance, so its sites go on with their state
    restored = CoordinatorCheckpoint.load(tmp_path)
    assert restored is not None and site_plan(run, 5, restored, tmp_path / "job").job_instance == "9f2c41d07e"
    assert plan.alerts == (PoisoningAlert(run.job, 2, "flagged-site-1", AnomalyRule.UPDATE_NORM),)  # anonymised


def test_a_secure_aggregation_job_reaches_the_site(tmp_path: Path) -> None:
    with pytest.raises(RunConfigError, match="aggregation"):  # multi-krum needs each update
        replace(every_key_changed(tmp_path / "job"), secure_aggregation=True)
    run = RunConfig(secure_aggregation=True, update_clip_norm=2.5, secure_aggregation_shares=5, out_dir=str(tmp_path))
    plan = site_plan(run, 2, CoordinatorCheckpoint(), tmp_path)
    assert plan.run == run and plan.run.secure_aggregation


def test_max_grad_norm_reaches_the_sites_dp_settings(tmp_path: Path) -> None:
    config = {"max-grad-norm": 0.5, "epsilon": 4.0, "trainable": "norms"}
    run = replace(RunConfig.from_run_config(config), num_server_rounds=5)
    privacy = site_plan(run, 1, CoordinatorCheckpoint(), tmp_path).privacy
    assert privacy is not None
    assert (privacy.max_grad_norm, privacy.epsilon, privacy.delta) == (0.5, 4.0, 1e-5)
    assert privacy.trainable is TrainableScope.NORMS
    assert privacy.planned_steps == 5 * RunConfig().local_steps


def test_without_a_budget_the_site_trains_without_dp(tmp_path: Path) -> None:
    assert site_plan(RunConfig(epsilon=0.0), 1, CoordinatorCheckpoint(), tmp_path).privacy is None


def test_an_unknown_key_is_named() -> None:
    with pytest.raises(RunConfigError, match="epsylon, max-grad-nrom"):
        RunConfig.from_run_config({"max-grad-nrom": 0.5, "epsylon": 1.0, "epsilon": 1.0})


@pytest.mark.parametrize(
    ("key", "value"),
    [("local-steps", "10"), ("local-steps", 2.5), ("epsilon", True), ("harmonise", "yes"), ("job", 3)],
)
def test_a_wrong_type_is_named(key: str, value: object) -> None:
    with pytest.raises(RunConfigError, match=f"run-config key {key} must be"):
        RunConfig.from_run_config({key: value})


def test_an_integer_is_a_valid_number() -> None:
    timeout = RunConfig.from_run_config({"round-timeout": 90}).round_timeout
    assert timeout == 90.0 and isinstance(timeout, float)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("delta", 1.5),
        ("max-grad-norm", 0.0),
        ("num-server-rounds", 0),
        ("held-out-fraction", 1.0),
        ("round-quorum", 1),  # below min-sites (2): a round could close without its quorum
        ("round-deadline", -1.0),
        ("staleness-exponent", -0.5),
    ],
)
def test_a_value_out_of_range_is_named(key: str, value: object) -> None:
    with pytest.raises(RunConfigError, match=f"run-config key {key} must be"):
        RunConfig.from_run_config({key: value})


def test_late_updates_are_dropped_or_folded_and_nothing_else() -> None:
    assert RunConfig.from_run_config({"late-updates": "fold", "round-quorum": 2}).closes_early
    assert not RunConfig().closes_early  # by default every round waits for every site, as before
    with pytest.raises(RunConfigError, match="drop, fold"):
        RunConfig.from_run_config({"late-updates": "sometimes"})


def test_an_unknown_aggregation_rule_lists_the_rules() -> None:
    with pytest.raises(RunConfigError, match="fedavg, median, trimmed-mean, multi-krum"):
        RunConfig.from_run_config({"aggregation": "krum"})


def test_the_round_count_under_its_former_name_is_read() -> None:
    assert RoundConfig.from_record({"num-rounds": 6}).run.num_server_rounds == 6
    with pytest.raises(RunConfigError, match="num-rounds"):
        RoundConfig.from_record({"num-rounds": 6, "num-server-rounds": 2})


def test_a_site_refuses_a_round_config_key_it_does_not_know() -> None:
    with pytest.raises(RunConfigError, match="round config: clip-norm"):
        RoundPlan.from_config(RunConfig().to_record() | {"clip-norm": 0.5})


def test_the_final_evaluation_carries_the_artifacts_lesion_rules_and_training_rounds_do_not(tmp_path: Path) -> None:
    state = CoordinatorCheckpoint(job_instance="abc")
    outputs = replace(load_task_spec(None).outputs, min_lesion_fraction=0.1, min_lesion_slices=2)
    final = site_plan(RunConfig(), 3, state, tmp_path, outputs)
    assert (final.lesion_fraction, final.lesion_slices) == (0.1, 2)
    assert (final.run, final.job_instance) == (RunConfig(out_dir=str(tmp_path)), "abc")
    training = site_plan(RunConfig(), 3, state, tmp_path)
    assert (training.lesion_fraction, training.lesion_slices) == (None, None)
    with pytest.raises(RunConfigError, match="lesion-slices must be an integer"):
        RoundPlan.from_config(RunConfig().to_record() | {"lesion-slices": 1.5})
