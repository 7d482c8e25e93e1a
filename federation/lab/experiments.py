"""Side-by-side experiments on the same data: centralised vs federated vs local-only, with and without
harmonisation, DP at several epsilons, one poisoned site under FedAvg vs robust aggregation, update
compression (what each site sends per round, and what it costs in Dice).

The federated arms run the job's own pieces in one process (the site's training and DP code, the
coordinator's harmonisation, aggregation and evaluation); only Flower's transport is left out, so every
arm sees the same studies, the same held-out test set (drawn from all sites) and the same number of
gradient steps. The transport's cost is measured separately, on real Flower processes (bench federation).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from radfed.federation.coordinator.checkpoint import reference_landmarks
from radfed.federation.job.planning import job_plan, needs_fingerprint
from radfed.federation.learning.aggregation import (
    DEFAULT_SERVER_LEARNING_RATE,
    Arrays,
    ServerOptimizer,
    ServerRule,
    SiteUpdate,
    aggregate,
)
from radfed.federation.learning.calibration import CalibrationSums, reference_fraction, reference_slices
from radfed.federation.learning.cohort import SiteCohort, TrainingSample, cohort_from_sources, source_fingerprints
from radfed.federation.learning.compression import (
    Compression,
    ErrorFeedback,
    compress_reply,
    payload_nbytes,
    restore_reply,
)
from radfed.federation.learning.evaluation import EvaluationCounts, evaluate_model, pooled_counts, predict_samples
from radfed.federation.learning.networks import TrainableScope, trainable_only
from radfed.federation.learning.privacy import PrivacySettings, train_private
from radfed.federation.learning.staleness import LateUpdates, rebase, staleness_weight
from radfed.federation.learning.training import (
    OptimizerState,
    TrainingSettings,
    arrays_to_model,
    direction_screened,
    model_to_arrays,
    new_model,
    train_local,
)
from radfed.inference.model.plan import DatasetFingerprint
from radfed.inference.model.taskspec import TaskSpec
from radfed.inference.model.windows import Prediction


class Mode(StrEnum):
    FEDERATED = "federated"
    CENTRALISED = "centralised"
    LOCAL = "local-only"
    BASE_ONLY = "base model only"  # the base model as it is, no training on the sites' studies


class Start(StrEnum):
    RANDOM = "random"  # random initial weights
    BASE = "base"  # the experiment's base model (trained centrally on public studies: train_base_model)


class Attack(StrEnum):
    SCALE = "scale"  # the site's honest update x20
    SIGN_FLIP = "sign-flip"  # the site's honest update, negated


@dataclass(frozen=True)
class Arm:
    name: str
    mode: Mode = Mode.FEDERATED
    harmonise: bool = True
    epsilon: float = 0.0  # 0: no DP
    aggregation: str = "fedavg"
    screen: bool = True  # leave flagged updates out (radfed's default)
    proximal_mu: float = 0.0
    poisoned_site: str | None = None  # this site sends a manipulated update
    attack: Attack = Attack.SCALE
    server_momentum: float = 0.0  # FedAvgM at the coordinator (0: plain FedAvg step)
    server_learning_rate: float = DEFAULT_SERVER_LEARNING_RATE  # the coordinator's step (1: plain FedAvg)
    server_rule: ServerRule = ServerRule.SGD  # adam / yogi: FedAdam / FedYogi (server_learning_rate per coordinate)
    left_out: tuple[str, ...] = ()  # these sites do not take part (their held-out studies are still tested)
    compression: str = "none"  # what each site sends (run-config key compression: none | fp16 | int8 | topk:F)
    # A straggler: this site's update takes late_by extra rounds to arrive. late_updates None: the coordinator
    # waits for it every round (synchronous; each round then lasts 1 + late_by rounds of the others); drop / fold:
    # rounds close without it (round-quorum), it is asked again once its update is in, which is then dropped or
    # folded as the job's RoundDriver does (federation/learning/staleness.py).
    straggler: str | None = None
    late_by: int = 0
    late_updates: LateUpdates | None = None
    staleness_exponent: float = 0.5
    start: Start = Start.RANDOM
    learning_rate: float | None = None  # the recipe's unless set (fine-tuning a base model takes smaller steps)
    trainable: TrainableScope = TrainableScope.ALL  # what the sites' training updates (run-config trainable)
    # the federated arm's recipe with these fields replaced, e.g. (("lesion_paste", 0.0),): one recipe change
    # measured against the spec's own in the same run
    recipe: tuple[tuple[str, Any], ...] = ()
    # False: each site starts every round with a fresh optimiser (no AdamW moments carried from its last round,
    # where the job carries them); measures whether a site's own stale direction costs the global model
    carry_optimizer_state: bool = True


EXPERIMENTS: dict[str, tuple[Arm, ...]] = {
    "centralised-vs-federated": (
        Arm("centralised", Mode.CENTRALISED),
        Arm("federated (FedAvg)"),
        Arm("federated (FedProx mu=0.1)", proximal_mu=0.1),
        Arm("local-only", Mode.LOCAL),
    ),
    "harmonisation": (Arm("federated, harmonised"), Arm("federated, own scaling", harmonise=False)),
    "privacy": (Arm("no DP"), Arm("DP epsilon 8", epsilon=8.0), Arm("DP epsilon 2", epsilon=2.0)),
    "poisoning": (
        Arm("clean, FedAvg"),
        Arm("poisoned, FedAvg unscreened", poisoned_site="site-3", screen=False),
        Arm("poisoned, FedAvg + screening", poisoned_site="site-3"),
        Arm("poisoned, median", poisoned_site="site-3", aggregation="median", screen=False),
        Arm("poisoned, multi-Krum", poisoned_site="site-3", aggregation="multi-krum", screen=False),
    ),
}


@dataclass(frozen=True)
class Budget:
    rounds: int = 5
    local_steps: int = 30
    held_out_fraction: float = 0.25
    seed: int = 0
    every_round: bool = True  # evaluate the global model after every round (else after the last only)


@dataclass
class ArmResult:
    arm: Arm
    pooled: dict[str, float | int | None]
    per_round: list[dict[str, float | int | None]] = field(default_factory=list)
    seconds: float = 0.0
    local_sites: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)
    flag_reasons: list[str] = field(default_factory=list)  # "round N site: reason"
    seed: int = 0
    final_arrays: Arrays | None = None  # the federated arms' last global model
    bytes_up: float | None = None  # federated arms: mean bytes a site sent per round (the compressed payload)
    # straggler arms: the coordinator's time in units of one round of the prompt sites, and what became of the
    # straggler's late updates
    time_units: int | None = None
    late: list[str] = field(default_factory=list)


def planned_spec(roots: Mapping[str, Path], spec: TaskSpec, *, private: bool = False) -> TaskSpec:
    """The spec under the job's plan, made as the coordinator makes it (from the sites' merged fingerprint
    summaries where the spec leaves the grid or patch open; ``private``: for a job with DP)."""
    if spec.plan is not None:
        return spec
    prints = None
    if needs_fingerprint(spec):
        prints = {
            name: DatasetFingerprint.from_studies(source_fingerprints(spec, [str(root)], None))
            for name, root in roots.items()
        }
    return spec.planned(job_plan(spec, prints, private=private))


def load_site_cohorts(
    roots: Mapping[str, Path], spec: TaskSpec, cache: Path | None = None, *, private: bool = False
) -> dict[str, SiteCohort]:
    """Every site's cohort under one plan (``planned_spec``)."""
    spec = planned_spec(roots, spec, private=private)
    return {
        name: cohort_from_sources(spec, [str(root)], cache_dir=cache / name if cache else None)
        for name, root in roots.items()
    }


def train_base_model(spec: TaskSpec, public: Sequence[Path], steps: int, seed: int = 0) -> Arrays:
    """A base model as a consortium would make one before a DP job: trained centrally, without DP, on public
    studies (other patients and scanners than the sites'), under the job's plan (``spec`` planned), each
    study in its own scaling (the job's harmonisation is not known yet)."""
    cohort = cohort_from_sources(spec, [str(root) for root in public])
    samples = cohort.samples_for(None)
    if not samples:
        raise ValueError(f"no usable public studies under {[str(p) for p in public]}")
    model = new_model(spec, seed=seed)
    train_local(model, samples, spec, TrainingSettings.from_spec(spec, seed=seed, steps=steps))
    return model_to_arrays(model)


class Experiment:
    def __init__(
        self, spec: TaskSpec, cohorts: Mapping[str, SiteCohort], budget: Budget, base: Arrays | None = None
    ) -> None:
        self.base = base  # what arms with start=BASE fine-tune
        self.cohorts = dict(cohorts)
        # the cohorts carry the job's plan (load_site_cohorts); the spec given may be the unplanned one
        self.spec = next(iter(self.cohorts.values())).spec if self.cohorts else spec
        self.budget = budget
        # No cohorts: the caller brings its own split (``federate``), unharmonised.
        self.landmarks = (
            reference_landmarks(
                {s: c.channel_landmarks(budget.held_out_fraction) for s, c in self.cohorts.items()},
                {s: len(c.split(budget.held_out_fraction)[0]) for s, c in self.cohorts.items()},
            )
            if self.cohorts
            else None
        )

    def split(self, harmonise: bool) -> tuple[dict[str, list[TrainingSample]], list[TrainingSample]]:
        harmonisation = self.landmarks if harmonise else None
        train, test = {}, []
        for site, cohort in self.cohorts.items():
            site_train, site_test = cohort.split(self.budget.held_out_fraction, harmonisation)
            train[site] = site_train
            test += site_test
        return train, test

    def arm_spec(self, arm: Arm) -> TaskSpec:
        """The spec a federated arm trains under: the experiment's, with the arm's learning rate and recipe changes."""
        changes = dict(arm.recipe)
        if arm.learning_rate is not None:
            changes["learning_rate"] = arm.learning_rate
        if not changes:
            return self.spec
        return replace(self.spec, training=replace(self.spec.training, **changes))

    def _initial(self, arm: Arm) -> Arrays:
        if arm.start is Start.RANDOM:
            return model_to_arrays(new_model(self.spec, seed=self.budget.seed))
        if self.base is None:
            raise ValueError(f"arm {arm.name!r} starts from a base model; the experiment has none")
        return [a.copy() for a in self.base]

    def _settings(
        self, seed: int, steps: int, mu: float = 0.0, server_round: int | None = None, spec: TaskSpec | None = None
    ) -> TrainingSettings:
        """``steps`` of the recipe; in a federated arm, round ``server_round``'s slice of the job's schedule."""
        spec = spec or self.spec
        if server_round is None:
            return TrainingSettings.from_spec(spec, seed=seed, steps=steps, proximal_mu=mu)
        return TrainingSettings.from_spec(
            spec,
            seed=seed,
            steps=steps,
            proximal_mu=mu,
            schedule_offset=(server_round - 1) * steps,
            schedule_total=self.budget.rounds * steps,
        )

    def run(self, arm: Arm, progress: Callable[[str], None] = lambda _: None) -> ArmResult:
        started = time.perf_counter()
        train, test = self.split(arm.harmonise)
        if arm.mode is Mode.BASE_ONLY:
            model = arrays_to_model(self.spec, self._initial(replace(arm, start=Start.BASE)))
            result = ArmResult(arm, evaluate_model(model, test, self.spec).summary())
        elif arm.mode is Mode.CENTRALISED:
            result = self._centralised(arm, train, test)
        elif arm.mode is Mode.LOCAL:
            result = self._local(arm, train, test)
        else:
            result = self._federated(arm, train, test, progress)
        result.seconds = time.perf_counter() - started
        result.seed = self.budget.seed
        return result

    def federate(
        self,
        arm: Arm,
        train: dict[str, list[TrainingSample]],
        test: list[TrainingSample],
        progress: Callable[[str], None] = lambda _: None,
    ) -> ArmResult:
        """A federated arm on a split the caller made (e.g. patient-level folds of a real set)."""
        return self._federated(arm, train, test, progress)

    def _centralised(self, arm: Arm, train: dict[str, list[TrainingSample]], test: list[TrainingSample]) -> ArmResult:
        pooled = [s for samples in train.values() for s in samples]
        model = new_model(self.spec, seed=self.budget.seed)
        steps = self.budget.rounds * self.budget.local_steps * len(train)  # as many steps as the federation
        train_local(model, pooled, self.spec, self._settings(self.budget.seed, steps))
        return ArmResult(arm, evaluate_model(model, test, self.spec).summary())

    def _local(self, arm: Arm, train: dict[str, list[TrainingSample]], test: list[TrainingSample]) -> ArmResult:
        sites = {}
        for site, samples in train.items():
            model = new_model(self.spec, seed=self.budget.seed)
            steps = self.budget.rounds * self.budget.local_steps
            train_local(model, samples, self.spec, self._settings(self.budget.seed, steps))
            sites[site] = evaluate_model(model, test, self.spec).summary()
        best = max(sites.values(), key=lambda m: (m.get("dice") or 0.0) + (m.get("auc") or 0.0))
        return ArmResult(arm, dict(best), local_sites=sites)

    def _federated(
        self,
        arm: Arm,
        train: dict[str, list[TrainingSample]],
        test: list[TrainingSample],
        progress: Callable[[str], None],
    ) -> ArmResult:
        arrays = self._initial(arm)
        spec = self.arm_spec(arm)
        result = ArmResult(arm, {})
        compression = Compression.parse(arm.compression)
        sent_bytes: list[int] = []
        optimizer_states: dict[str, OptimizerState | None] = {}  # each site keeps its own, as in the job
        server = ServerOptimizer(arm.server_learning_rate, arm.server_momentum, arm.server_rule)
        server_state: Arrays | None = None
        in_flight: list[tuple[int, Arrays, Arrays, int]] = []  # the straggler's: (round, origin, model, examples)
        asynchronous = arm.straggler is not None and arm.late_updates is not None
        with tempfile.TemporaryDirectory() as accountants:
            for server_round in range(1, self.budget.rounds + 1):
                updates = []
                arrived = [f for f in in_flight if f[0] + arm.late_by == server_round]
                for origin_round, origin, late_model, examples in arrived:
                    in_flight.remove((origin_round, origin, late_model, examples))
                    if arm.late_updates is LateUpdates.FOLD:
                        weight = staleness_weight(examples, arm.late_by, arm.staleness_exponent)
                        updates.append(SiteUpdate(str(arm.straggler), rebase(late_model, origin, arrays), weight))
                    result.late.append(f"round {origin_round} -> {server_round}: {arm.late_updates}")
                for site, samples in train.items():
                    if site in arm.left_out:
                        continue
                    if asynchronous and site == arm.straggler and (in_flight or arrived):
                        continue  # still training at this round's start (its late update comes in during it)
                    model = arrays_to_model(self.spec, arrays)
                    settings = self._settings(
                        self.budget.seed + server_round, self.budget.local_steps, arm.proximal_mu, server_round, spec
                    )
                    state = optimizer_states.get(site) if arm.carry_optimizer_state else None
                    if arm.epsilon > 0:
                        privacy = PrivacySettings(
                            arm.epsilon,
                            1e-5,
                            planned_steps=self.budget.rounds * self.budget.local_steps,
                            trainable=arm.trainable,
                        )
                        accountant = Path(accountants) / f"{site}.json"
                        log, _ = train_private(
                            model, samples, spec, settings, privacy, accountant, self.budget.local_steps, state
                        )
                    else:
                        with trainable_only(model, arm.trainable):
                            log = train_local(model, samples, spec, settings, optimizer_state=state)
                    optimizer_states[site] = log.optimizer_state
                    sent = model_to_arrays(model)
                    if site == arm.poisoned_site:
                        factor = -1.0 if Attack(arm.attack) is Attack.SIGN_FLIP else 20.0
                        sent = [(g + factor * (h - g)).astype(h.dtype) for g, h in zip(arrays, sent, strict=True)]
                    # as the job does: the site compresses its update (top-k's residual in its own folder),
                    # the coordinator restores the full model before screening and aggregation
                    feedback = ErrorFeedback(Path(accountants) / f"{site}-feedback")
                    reply = compress_reply(compression, arrays, sent, feedback, server_round)
                    sent_bytes.append(payload_nbytes(reply))
                    if asynchronous and site == arm.straggler and arm.late_by > 0:
                        in_flight.append(
                            (server_round, arrays, restore_reply(compression, arrays, reply), len(samples))
                        )
                        continue
                    updates.append(SiteUpdate(site, restore_reply(compression, arrays, reply), len(samples)))
                budget = self.budget
                directional = direction_screened(spec.training, server_round, budget.rounds, budget.local_steps)
                outcome = aggregate(arrays, updates, arm.aggregation, screen=arm.screen, screen_direction=directional)
                arrays, server_state = server.step(arrays, list(outcome.arrays), server_state)
                result.flagged += [f.site for f in outcome.flags]
                result.flag_reasons += [f"round {server_round} {f.site}: {f.reason}" for f in outcome.flags]
                if self.budget.every_round or server_round == self.budget.rounds:
                    model = arrays_to_model(self.spec, arrays)
                    predictions = list(predict_samples(model, test, self.spec))
                    summary = pooled_counts(test, predictions, self.spec).summary()
                    if server_round == self.budget.rounds:
                        pooled_train = [s for samples in train.values() for s in samples]
                        calibrated = cross_calibrated(predictions, test, self.spec, pooled_train)
                        summary |= {f"calibrated_{k}": calibrated.get(k) for k in CALIBRATED_FIGURES}
                    result.per_round.append({"round": server_round, **summary})
                    progress(f"{arm.name}: round {server_round}, Dice {summary.get('dice')}")
        result.final_arrays = arrays
        if arm.straggler is not None:
            result.time_units = self.budget.rounds * (1 if asynchronous else 1 + arm.late_by)
        result.bytes_up = sum(sent_bytes) / len(sent_bytes) if sent_bytes else None
        result.pooled = dict(result.per_round[-1])
        result.pooled.pop("round", None)
        return result


CALIBRATED_FIGURES = ("dice", "fp_components_per_study", "volume_ratio")


def cross_calibrated(
    predictions: Sequence[Prediction],
    test: Sequence[TrainingSample],
    spec: TaskSpec,
    train: Sequence[TrainingSample],
) -> dict[str, float | int | None]:
    """The test figures under what a federated job's artifact does with its output settings, measured on
    studies that chose none of them: the lesion rules from the training masks (the coordinator's pooled sums
    equal these), then threshold, minimum size and share chosen on every other test study (as the sites' sums on
    their held-out studies choose them) and applied to the rest, both ways round. Empty with under 2 studies."""
    if len(test) < 2:
        return {}
    volume = spec.outputs.min_lesion_volume_mm3
    if spec.outputs.min_lesion_fraction is None:
        spec = spec.with_outputs(min_lesion_fraction=reference_fraction(train, volume))
    if spec.outputs.min_lesion_slices is None:
        spec = spec.with_outputs(min_lesion_slices=reference_slices(train, volume))
    halves = (range(0, len(test), 2), range(1, len(test), 2))
    counts = EvaluationCounts()
    for chosen_on, applied_to in (halves, halves[::-1]):
        outputs = spec.outputs
        sums = CalibrationSums.of(
            [predictions[i] for i in chosen_on],
            [test[i] for i in chosen_on],
            volume,
            outputs.lesion_fraction,
            outputs.lesion_slices,
        )
        tuned = sums.calibration(volume, outputs.lesion_fraction).applied_to(spec)
        studies = [test[i] for i in applied_to]
        counts += pooled_counts(studies, [predictions[i] for i in applied_to], tuned)
    return counts.summary()


def results_table(results: Sequence[ArmResult]) -> list[list[object]]:
    rows: list[list[object]] = []
    for r in results:
        p = r.pooled
        flagged = ",".join(sorted(set(r.flagged))) or "-"
        rows.append(
            [r.arm.name, p.get("studies"), p.get("dice"), p.get("auc"), p.get("lesion_sensitivity"), r.seconds, flagged]
        )
    return rows


TABLE_HEADER = ["arm", "test studies", "Dice", "AUC", "lesion sensitivity", "seconds", "flagged"]
