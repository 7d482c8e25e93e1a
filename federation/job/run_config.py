"""The run config of a federated job: every key an operator can set (``flwr run ... --run-config "k=v ..."``),
its type and its one default. ``deploy/flower/pyproject.toml`` declares the same keys with the same defaults
(Flower refuses an override for a key the app does not declare; a test keeps the two in step).

The coordinator reads Flower's ``context.run_config`` once (``RunConfig.from_run_config``). Every message to a
site carries all of it in the round's config (``RoundConfig.to_record``), which the site parses back once
(``RoundConfig.from_record``): no module downstream restates a key's default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from functools import cache
from typing import Any, Self, get_type_hints

from radfed.federation.job import records
from radfed.federation.job.alerts import ALERTS_CONFIG_KEY, PoisoningAlert, alerts_from_config, alerts_to_config
from radfed.federation.job.planning import PLAN_CONFIG_KEY
from radfed.federation.learning.aggregation import (
    DEFAULT_SERVER_LEARNING_RATE,
    AggregationRule,
    Screening,
    ServerRule,
)
from radfed.federation.learning.compression import Compression
from radfed.federation.learning.membership import MembershipAudit
from radfed.federation.learning.networks import TrainableScope
from radfed.federation.learning.staleness import LateUpdates
from radfed.federation.learning.subgroup_cells import MIN_CELL_FLOOR
from radfed.inference.errors import RadfedError

ConfigValue = bool | int | float | str | list[float]

SERVER_ROUND_KEY = "server-round"  # 0 before round 1 (plan, harmonisation)
# One run of a job, drawn by the coordinator when the job starts and kept in its checkpoint (a resumed job keeps
# it): a site keeps its optimiser, replies and residuals per run, so a new job under an old name starts afresh.
JOB_INSTANCE_KEY = "job-instance"
# The final evaluation's config: the lesion rules the coordinator fixed from the sites' reference-mask sums
# (share of the study's largest, minimum slice extent), so sites evaluate and calibrate under the artifact's rules.
LESION_FRACTION_KEY = "lesion-fraction"
LESION_SLICES_KEY = "lesion-slices"
_ROUND_KEYS = frozenset(
    {SERVER_ROUND_KEY, PLAN_CONFIG_KEY, ALERTS_CONFIG_KEY, JOB_INSTANCE_KEY, LESION_FRACTION_KEY, LESION_SLICES_KEY}
)
# Round configs of coordinators before RunConfig named the round count differently.
_FORMER_NAMES = {"num-rounds": "num-server-rounds"}


class RunConfigError(RadfedError, ValueError):
    """A run-config key the job does not know, or a value of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """Every key of a federated job's run config: the key is the field's name with hyphens."""

    num_server_rounds: int = 3
    local_steps: int = 10  # each site's optimiser steps per round
    min_sites: int = 2  # quorum: a round with fewer replies is retried, then the job fails
    epsilon: float = 8.0  # each site's DP budget for the whole job (0: no differential privacy)
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # DP-SGD's per-study gradient clipping norm
    # What the sites train, with or without DP: all | norms (normalisation scales and shifts, biases and the output
    # layers, ~0.2 % of the weights; under DP-SGD the clipped gradient is then spread over fewer coordinates
    # against the same noise per coordinate). Meant for fine-tuning a base model (base-model).
    trainable: TrainableScope = TrainableScope.ALL
    task: str = ""  # a task spec's name or path ("": the default task)
    job: str = "radfed-job"  # names the job's state at every site (optimiser, privacy accountant, replies)
    out_dir: str = "radfed-federated-job"  # the coordinator's checkpoint, metrics and artifact
    model_version: str = "1.0.0"
    round_timeout: float = 600.0  # seconds to wait for the sites' replies (and for the quorum to connect)
    aggregation: AggregationRule = AggregationRule.FEDAVG  # anomalous updates are always left out
    # How screening and multi-Krum compare updates: exact (pairwise, O(N^2) in sites, every update held) | sketch
    # (O(N); FedAvg and multi-Krum then stream) | auto (exact up to 32 sites): federation/learning/aggregation.py and
    # streaming.py
    screening: Screening = Screening.AUTO
    server_momentum: float = 0.0  # > 0: FedAvgM
    server_learning_rate: float = DEFAULT_SERVER_LEARNING_RATE  # 1: plain FedAvg
    # sgd (the step above, FedAvg / FedAvgM) | adam | yogi (FedAdam / FedYogi: server-learning-rate is then the step
    # per coordinate, e.g. 0.01, and server-momentum 0); aggregation.ServerOptimizer
    server_optimizer: ServerRule = ServerRule.SGD
    proximal_mu: float = 0.0  # > 0: FedProx
    harmonise: bool = True  # share intensity landmarks before round 1
    held_out_fraction: float = 0.25  # share of each site's studies kept for evaluation
    round_attempts: int = 3  # a round below quorum is retried with the sites connected then
    # Stragglers (federation/learning/staleness.py): a training round closes as soon as round-quorum sites have sent
    # their update (0: every site asked), or round-deadline seconds after it started once min-sites have (0: no
    # deadline); round-timeout still bounds every wait. A site still training is not asked again until it answers;
    # its late update is dropped or folded into the round in which it arrives, weighted (1 + staleness) ** -exponent.
    round_quorum: int = 0
    round_deadline: float = 0.0
    late_updates: LateUpdates = LateUpdates.DROP  # drop | fold
    staleness_exponent: float = 0.5
    # Each training round asks this many of the connected sites, drawn afresh each round from the job's seed (0:
    # every site; FedAvg's client sampling). Evaluation, planning and harmonisation still ask every site.
    sites_per_round: int = 0
    # Flower's simulation runtime only (radfed federation simulate): the folder holding each simulated site's data
    # (``site-<partition>``) and state; a deployed site never reads it (its data comes from its own node config).
    simulation_root: str = ""
    rollout: bool = True  # store the final artifact in every site's model registry
    seed: int = 0  # the initial global model's weights
    base_model: str = ""  # an artifact folder at the coordinator to fine-tune (its plan wins)
    learning_rate: float = 0.0  # > 0: overrides the task recipe's learning rate at every site
    compression: str = "none"  # what a site sends: none | fp16 | int8 | topk:F (the update, see compression.py)
    anonymise_alerts: bool = False  # poisoning alerts name flagged sites by pseudonyms (federation/job/alerts.py)
    # At the end of the job each site attacks the final model on its training vs held-out studies and sends the
    # attack's AUC and TPR at 1 % FPR (federation/learning/membership.py). loss by default: one inference pass over the
    # site's studies, no training; lira adds membership-references trainings of membership-steps steps each, all
    # within the final evaluation's round-timeout (raise it with lira).
    membership_audit: MembershipAudit = MembershipAudit.LOSS  # off | loss | lira
    membership_references: int = 4  # LiRA's reference models per site (each study is left out of half)
    membership_steps: int = 0  # each reference model's steps (0: the job's, num-server-rounds x local-steps)
    # Bias checks (federation/learning/subgroups.py): a site sends its final evaluation per subgroup (vendor, field
    # strength, age band, sex, from DICOM headers) only for subgroups of at least this many held-out studies.
    bias_min_cell: int = 5
    # Output calibration (federation/learning/calibration.py): a site sends its summed Dice per output setting only
    # with at least this many held-out studies, and its study-label losses only with this many labelled ones (with
    # one, the sums would be that study's own figures).
    calibration_min_studies: int = 2
    # Evaluation (every round's, of the incoming global model, and the final one): a site sends its summed figures
    # (Dice, lesions found, study counts, score histogram, volumes) only with at least this many held-out studies;
    # from one study they would be that patient's own (its tumour's volume, its lesion count).
    evaluation_min_studies: int = 2
    # Secure aggregation (Flower's SecAgg+, federation/coordinator/secure_aggregation.py): the coordinator learns only
    # the sum of the sites' updates. Each site first clips its update to update-clip-norm (L2; also the range the
    # masked integers cover, so no coordinate is ever cut). Robust aggregation, screening, compression and early-closing
    # rounds need each site's update and are refused with it. secure-aggregation-threshold: the share of a round's
    # sites whose key shares unmask the sum (more may drop out mid-round and the round still completes);
    # secure-aggregation-shares: each site's neighbours in SecAgg+ (0: every site of the round, plain SecAgg).
    secure_aggregation: bool = False
    update_clip_norm: float = 10.0
    secure_aggregation_threshold: float = 0.6
    secure_aggregation_shares: int = 0

    def __post_init__(self) -> None:
        _require(self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds, "at least 1")
        _require(self.local_steps >= 1, "local-steps", self.local_steps, "at least 1")
        _require(self.min_sites >= 1, "min-sites", self.min_sites, "at least 1")
        _require(self.round_attempts >= 1, "round-attempts", self.round_attempts, "at least 1")
        _require(self.round_timeout > 0, "round-timeout", self.round_timeout, "> 0")
        every_or_quorum = f"0 (every site) or >= min-sites ({self.min_sites})"
        quorum_ok = self.round_quorum == 0 or self.round_quorum >= self.min_sites
        _require(quorum_ok, "round-quorum", self.round_quorum, every_or_quorum)
        sample_ok = self.sites_per_round == 0 or self.sites_per_round >= self.min_sites
        _require(sample_ok, "sites-per-round", self.sites_per_round, every_or_quorum)
        _require(self.round_deadline >= 0, "round-deadline", self.round_deadline, ">= 0 (0: none)")
        _require(self.staleness_exponent >= 0, "staleness-exponent", self.staleness_exponent, ">= 0")
        _require(self.epsilon >= 0, "epsilon", self.epsilon, ">= 0")
        _require(0 < self.delta < 1, "delta", self.delta, "in (0, 1)")
        _require(self.max_grad_norm > 0, "max-grad-norm", self.max_grad_norm, "> 0")
        _require(self.server_learning_rate > 0, "server-learning-rate", self.server_learning_rate, "> 0")
        _require(0 <= self.server_momentum < 1, "server-momentum", self.server_momentum, "in [0, 1)")
        if self.server_optimizer is not ServerRule.SGD:
            adaptive = f"with server-optimizer = {self.server_optimizer}"
            step_ok = self.server_learning_rate < 1
            _require(
                step_ok, "server-learning-rate", self.server_learning_rate, f"< 1, a step per coordinate, {adaptive}"
            )
            _require(self.server_momentum == 0, "server-momentum", self.server_momentum, f"0 {adaptive}")
        _require(self.proximal_mu >= 0, "proximal-mu", self.proximal_mu, ">= 0")
        _require(0 <= self.held_out_fraction < 1, "held-out-fraction", self.held_out_fraction, "in [0, 1)")
        _require(self.learning_rate >= 0, "learning-rate", self.learning_rate, ">= 0 (0: the task recipe's)")
        _require(self.membership_references >= 2, "membership-references", self.membership_references, "at least 2")
        _require(self.bias_min_cell >= MIN_CELL_FLOOR, "bias-min-cell", self.bias_min_cell, f">= {MIN_CELL_FLOOR}")
        calibration_ok = self.calibration_min_studies >= MIN_CELL_FLOOR
        _require(calibration_ok, "calibration-min-studies", self.calibration_min_studies, f">= {MIN_CELL_FLOOR}")
        evaluation_ok = self.evaluation_min_studies >= MIN_CELL_FLOOR
        _require(evaluation_ok, "evaluation-min-studies", self.evaluation_min_studies, f">= {MIN_CELL_FLOOR}")
        _require(self.membership_steps >= 0, "membership-steps", self.membership_steps, ">= 0 (0: the job's)")
        try:
            Compression.parse(self.compression)
        except ValueError as exc:
            raise RunConfigError(f"run-config key compression {exc}") from None
        _require(self.update_clip_norm > 0, "update-clip-norm", self.update_clip_norm, "> 0")
        threshold_ok = 0 < self.secure_aggregation_threshold <= 1
        _require(threshold_ok, "secure-aggregation-threshold", self.secure_aggregation_threshold, "in (0, 1]")
        shares_ok = self.secure_aggregation_shares == 0 or self.secure_aggregation_shares >= 3
        _require(shares_ok, "secure-aggregation-shares", self.secure_aggregation_shares, "0 (every site) or >= 3")
        if self.secure_aggregation:
            self._require_sum_only()

    def _require_sum_only(self) -> None:
        """Secure aggregation shows the coordinator only the sum: what needs each site's update is refused."""
        sum_only = "with secure-aggregation = true (the coordinator sees only the sum of the updates)"
        _require(self.aggregation is AggregationRule.FEDAVG, "aggregation", str(self.aggregation), f"fedavg {sum_only}")
        _require(self.compression == "none", "compression", self.compression, f"none {sum_only}")
        early = f"{self.round_quorum} / {self.round_deadline}"
        _require(not self.closes_early, "round-quorum / round-deadline", early, f"0 / 0 {sum_only}")
        _require(self.min_sites >= 2, "min-sites", self.min_sites, f"at least 2 {sum_only}")

    @property
    def closes_early(self) -> bool:
        """Whether a training round may close before every site asked has answered."""
        return self.round_quorum > 0 or self.round_deadline > 0

    @property
    def update_compression(self) -> Compression:
        """The ``compression`` key, parsed (checked when the config was made)."""
        return Compression.parse(self.compression)

    @property
    def reference_steps(self) -> int:
        """Steps of each LiRA reference model (``membership-steps``; 0: as many as a site trains in the job)."""
        return self.membership_steps or self.num_server_rounds * self.local_steps

    @staticmethod
    def keys() -> tuple[str, ...]:
        """Every run-config key, in declaration order."""
        return tuple(_field_types())

    @classmethod
    def from_run_config(cls, values: Mapping[str, Any]) -> RunConfig:
        """The job's run config from Flower's ``context.run_config`` (the app's declared defaults with the
        operator's overrides). An unknown key or a value of the wrong type raises ``RunConfigError``; a key
        that is absent takes its default."""
        return cls._parse(values, "run config")

    @classmethod
    def _parse(cls, values: Mapping[str, Any], where: str) -> RunConfig:
        types = _field_types()
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise RunConfigError(f"unknown key(s) in the {where}: {', '.join(unknown)} (known: {', '.join(types)})")
        return cls(**{types[key][0]: _typed(key, types[key][1], value) for key, value in values.items()})

    def to_record(self) -> dict[str, ConfigValue]:
        """Every key with its value, as Flower's records hold them (a choice as its name)."""
        return {key: _plain(getattr(self, name)) for key, (name, _) in _field_types().items()}


@dataclass(frozen=True)
class RoundConfig:
    """The config of every message to a site: the job's whole run config, the server round (0 before round
    1), what the coordinator fixed before round 1 (the plan's JSON, the reference intensity landmarks), every
    poisoning alert of the job so far, and which run of the job this is (empty from a coordinator before it). The
    final evaluation's also carries the lesion rules fixed for the artifact."""

    run: RunConfig
    server_round: int = 0
    plan: str | None = None
    harmonisation: dict[str, list[float]] | None = None
    alerts: tuple[PoisoningAlert, ...] = ()
    job_instance: str = ""
    lesion_fraction: float | None = None
    lesion_slices: int | None = None

    def to_record(self) -> dict[str, ConfigValue]:
        values = self.run.to_record() | {SERVER_ROUND_KEY: self.server_round}
        if self.job_instance:
            values[JOB_INSTANCE_KEY] = self.job_instance
        if self.plan:
            values[PLAN_CONFIG_KEY] = self.plan
        if self.alerts:
            values[ALERTS_CONFIG_KEY] = alerts_to_config(self.alerts)
        if self.lesion_fraction is not None:
            values[LESION_FRACTION_KEY] = self.lesion_fraction
        if self.lesion_slices is not None:
            values[LESION_SLICES_KEY] = self.lesion_slices
        for channel, landmarks in (self.harmonisation or {}).items():
            values[records.HARMONISATION_PREFIX + channel] = [float(v) for v in landmarks]
        return values

    @classmethod
    def from_record(cls, values: Mapping[str, Any]) -> Self:
        """Parse a round's config (what ``to_record`` wrote); a run-config key that is absent takes its
        default, an unknown one raises ``RunConfigError`` (a coordinator newer than this site)."""
        run_values: dict[str, Any] = {}
        for key, value in values.items():
            if key in _ROUND_KEYS or key.startswith(records.HARMONISATION_PREFIX):
                continue
            run_values[_FORMER_NAMES.get(key, key)] = value
        for former, key in _FORMER_NAMES.items():
            if former in values and key in values and values[former] != values[key]:
                raise RunConfigError(f"the round config gives {former}={values[former]!r} and {key}={values[key]!r}")
        extra: dict[str, Any] = {}
        if SERVER_ROUND_KEY in values:
            extra["server_round"] = _typed(SERVER_ROUND_KEY, int, values[SERVER_ROUND_KEY])
        if LESION_FRACTION_KEY in values:
            extra["lesion_fraction"] = _typed(LESION_FRACTION_KEY, float, values[LESION_FRACTION_KEY])
        if LESION_SLICES_KEY in values:
            extra["lesion_slices"] = _typed(LESION_SLICES_KEY, int, values[LESION_SLICES_KEY])
        run = RunConfig._parse(run_values, "round config")
        alerts = records.text(values, ALERTS_CONFIG_KEY)
        return cls(
            run,
            plan=records.text(values, PLAN_CONFIG_KEY) or None,
            harmonisation=records.landmarks(values),
            alerts=alerts_from_config(alerts, run.job) if alerts else (),
            job_instance=records.text(values, JOB_INSTANCE_KEY),
            **extra,
        )


@cache
def _field_types() -> dict[str, tuple[str, type]]:
    """Key -> (field name, type) of every RunConfig field."""
    hints = get_type_hints(RunConfig)
    return {f.name.replace("_", "-"): (f.name, hints[f.name]) for f in fields(RunConfig)}


def _typed(key: str, kind: type[Any], value: Any) -> Any:
    """``value`` as ``kind``; an int is a valid float (TOML writes ``600`` for ``600.0``), a bool is no number."""
    if kind is bool:
        valid = isinstance(value, bool)
    elif kind is int:
        valid = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        valid = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        valid = isinstance(value, str)
    if not valid:
        raise RunConfigError(f"run-config key {key} must be {_TYPE_NAMES.get(kind, 'text')}, got {value!r}")
    if issubclass(kind, StrEnum):
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(choice.value for choice in kind)
            raise RunConfigError(f"run-config key {key} must be one of {choices}, got {value!r}") from None
    return kind(value)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _plain(value: Any) -> ConfigValue:
    return str(value.value) if isinstance(value, StrEnum) else value


def _require(condition: bool, key: str, value: object, requirement: str) -> None:
    if not condition:
        raise RunConfigError(f"run-config key {key} must be {requirement}, got {value!r}")
