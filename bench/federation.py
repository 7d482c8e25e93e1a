"""Federated training: quality (federated vs centralised vs best local-only, with and without harmonisation,
DP at two epsilons, on one held-out test set drawn from all sites) and the cost of Flower's transport per
round (real SuperLink + 3 SuperNodes with TLS and node authentication on loopback).

    python -m bench federation            # RADFED_BENCH_QUICK=1 for a smoke-sized run
    RADFED_BENCH_FEDERATION=privacy python -m bench federation   # the privacy curve (long: 15 arms)
    RADFED_BENCH_FEDERATION=privacy RADFED_BENCH_PRIVACY_STUDIES=100 RADFED_BENCH_PRIVACY_EPSILONS=8 ...  # goal pair
    RADFED_BENCH_PRIVACY_SERVER_LR=2 ...   # the from-scratch arms' coordinator step (default: the job's, 1)
    RADFED_BENCH_PRIVACY_VARIANTS=no-paste,voxel,voxel+no-paste ...  # no-DP arms from scratch, one recipe change each
    RADFED_BENCH_PRIVACY_ROUNDS=24 RADFED_BENCH_PRIVACY_LOCAL_STEPS=30 ...  # the job's budget (default 8 x 30)
    RADFED_BENCH_FEDERATION=compression python -m bench federation   # update compression: bytes and Dice
    RADFED_BENCH_FEDERATION=membership python -m bench federation    # membership-inference AUC, with and without DP
    RADFED_BENCH_FEDERATION=stragglers python -m bench federation    # a late site: wait, drop or fold its update
    RADFED_BENCH_FEDERATION=scale python -m bench federation         # N = 10, 30, 100 sites on the simulation runtime
    RADFED_BENCH_FEDERATION=secure python -m bench federation        # SecAgg+ against plain FedAvg on real Flower
    RADFED_BENCH_FEDERATION=reconstruction python -m bench federation  # gradient inversion, with and without DP
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import table
from radfed.federation.coordinator.checkpoint import read_metrics
from radfed.federation.lab.experiments import (
    CALIBRATED_FIGURES,
    Arm,
    ArmResult,
    Attack,
    Budget,
    Experiment,
    Mode,
    Start,
    load_site_cohorts,
    planned_spec,
    train_base_model,
)
from radfed.federation.lab.loopback import FederationOptions, LoopbackFederation
from radfed.federation.lab.simulation import CohortSizes, Simulation, final_evaluation, round_costs, synthesize_sites
from radfed.federation.lab.simulation import run as run_simulation
from radfed.federation.learning.cohort import SiteCohort
from radfed.federation.learning.membership import (
    MembershipAudit,
    evaluate_attack,
    lira_offline_scores,
    logit_confidence,
    loss_scores,
)
from radfed.federation.learning.networks import TrainableScope
from radfed.federation.learning.staleness import LateUpdates
from radfed.federation.learning.training import arrays_to_model
from radfed.federation.site.membership_audit import AuditSettings, reference_confidences, study_losses
from radfed.federation.site.supernode import FLOWER_HEARTBEAT_S, FLOWER_IDLE_PULL_S
from radfed.federation.site.worker import simulated_site_name
from radfed.inference.model.recipe import ForegroundSampling, PasteInto
from radfed.inference.model.taskspec import TaskSpec, load_task_spec
from radfed.inference.testing.synthetic.writer import synthesize_to_folder

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 8  # at 5, the federated Dice still moved by +-0.1 from round to round
ARMS = (
    Arm("centralised", Mode.CENTRALISED),
    Arm("federated", Mode.FEDERATED),
    Arm("best local-only", Mode.LOCAL),
    Arm("federated, server lr 2", server_learning_rate=2.0),  # the default before session 27
    Arm("federated, no harmonisation", harmonise=False),
    Arm("federated, DP eps 8", epsilon=8.0),
    Arm("federated, DP eps 2", epsilon=2.0),
    Arm("federated, site-3 sends x20, FedAvg + screening", poisoned_site="site-3"),
    Arm("federated, site-3 sign-flips, FedAvg + screening", poisoned_site="site-3", attack=Attack.SIGN_FLIP),
    Arm("federated without site-3 (what screening leaves)", left_out=("site-3",)),
    Arm(
        "federated, site-3 sends x20, median (no screening)", poisoned_site="site-3", aggregation="median", screen=False
    ),
)


def quality(work: Path, quick: bool) -> None:
    """Every arm on the same studies and held-out test set, repeated over seeds (the initial weights and
    the crops drawn): one run decides nothing at 16 test studies, so the table gives mean and spread."""
    studies, budget = (
        (6, Budget(rounds=2, local_steps=3))
        if quick
        else (12, Budget(rounds=ROUNDS, local_steps=30, every_round=False))
    )
    # the same steps in shorter rounds, e.g. RADFED_BENCH_ROUNDS=24 RADFED_BENCH_LOCAL_STEPS=10 (a real job's 10)
    budget = replace(
        budget,
        rounds=int(os.environ.get("RADFED_BENCH_ROUNDS", budget.rounds)),
        local_steps=int(os.environ.get("RADFED_BENCH_LOCAL_STEPS", budget.local_steps)),
    )
    # one seed by default (about 50 min here for every arm); the README's table used RADFED_BENCH_SEEDS=0,1,2
    seeds = [int(s) for s in os.environ.get("RADFED_BENCH_SEEDS", "0").split(",")]
    spec, cohorts = _synthetic_sites(work, studies)
    chosen = os.environ.get("RADFED_BENCH_ARMS")  # e.g. "centralised;federated": a subset, by exact name
    arms = [a for a in ARMS if not chosen or a.name in chosen.split(";")]
    runs: dict[str, list[ArmResult]] = {arm.name: [] for arm in arms}
    plan = [(replace(budget, seed=seed), arm) for seed in seeds for arm in arms]
    # (arm, seed) runs side by side, one torch thread each: more throughput than one run on all cores
    jobs = int(os.environ.get("RADFED_BENCH_JOBS", min(len(plan), os.cpu_count() or 1)))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch threads
    with ProcessPoolExecutor(jobs, context, initializer=_one_thread if jobs > 1 else None) as pool:
        futures = [pool.submit(_run_arm, spec, cohorts, b, arm) for b, arm in plan]
        for (_, arm), future in zip(plan, futures, strict=True):
            runs[arm.name].append(future.result())
    table(
        f"Federated vs centralised vs local-only (3 small synthetic sites x {studies} studies, "
        f"{budget.rounds} rounds x {budget.local_steps} steps; the same held-out studies for every arm; "
        f"mean (min-max) over seeds {','.join(map(str, seeds))})",
        [
            "arm",
            "test studies",
            "Dice",
            "AUC",
            "lesion sensitivity",
            "Dice per seed",
            "AUC per seed",
            "seconds per run",
            "flagged",
        ],
        [
            [
                name,
                results[0].pooled.get("studies"),
                _spread([r.pooled.get("dice") for r in results]),
                _spread([r.pooled.get("auc") for r in results]),
                _spread([r.pooled.get("lesion_sensitivity") for r in results]),
                " ".join(_f(r.pooled.get("dice")) for r in results),
                " ".join(_f(r.pooled.get("auc")) for r in results),
                f"{statistics.mean(r.seconds for r in results):.0f}",
                ",".join(sorted({s for r in results for s in r.flagged})) or "-",
            ]
            for name, results in runs.items()
        ],
        f"RADFED_BENCH_FEDERATION=quality RADFED_BENCH_SEEDS={','.join(map(str, seeds))}"
        + (f" RADFED_BENCH_ROUNDS={budget.rounds} RADFED_BENCH_LOCAL_STEPS={budget.local_steps}" if not quick else "")
        + (f' RADFED_BENCH_ARMS="{chosen}"' if chosen else "")
        + " python -m bench federation",
    )
    if len(seeds) == 1:
        print("one seed: the final-round Dice of one run moves by about 0.1 between seeds and rounds")
    means = {
        name: {k: _mean([r.pooled.get(k) for r in results]) for k in ("dice", "auc")} for name, results in runs.items()
    }
    for key in ("dice", "auc"):
        print(f"federated / centralised {key}: {_f(_ratio(means, 'federated', 'centralised', key))} (goal >= 0.95)")
    for arm in arms:
        for result in runs[arm.name]:
            if not arm.poisoned_site and result.flag_reasons:  # an honest site left out: worth knowing why
                print(f"{arm.name}, seed {result.seed}: honest update flagged: {'; '.join(result.flag_reasons)}")
        if arm.poisoned_site:
            print(
                f"{arm.name} / clean federated Dice: {_f(_ratio(means, arm.name, 'federated', 'dice'))} (goal >= 0.95)"
            )


PRIVACY_EPSILONS = (1.0, 2.0, 4.0, 8.0)
PRIVACY_COHORTS = (12, 40, 100)
PRIVACY_SITES = ("site-1", "site-2", "site-3")
PUBLIC_STUDIES = 100  # the public set the base model learns from: 2 other scanners x 50 studies
BASE_STEPS = 480
FINE_TUNE_LEARNING_RATE = 1e-4  # the demo's (radfed demo --fine-tune-learning-rate)


def _public_studies(work: Path, quick: bool) -> list[Path]:
    """The public set a base model learns from: two scanners other than the sites' three (site profiles 4, 5)."""
    per_scanner = 3 if quick else PUBLIC_STUDIES // 2
    return synthesize_to_folder(
        work / "public", sites=2, studies_per_site=per_scanner, seed=1005, small=True, first_site=len(PRIVACY_SITES) + 1
    )


TUNED_ENV = "RADFED_BENCH_PRIVACY_TUNED"
VARIANTS_ENV = "RADFED_BENCH_PRIVACY_VARIANTS"
# Recipe changes a no-DP arm from scratch can make, one at a time or joined by "+": the two since the curve's first
# run (session 15) undone, lesion pasting (default since session 24) and patches forced onto a lesion component
# rather than a lesion voxel (session 18), and pasting into the forced patches only (session 30).
RECIPE_VARIANTS: dict[str, tuple[tuple[str, Any], ...]] = {
    "no-paste": (("lesion_paste", 0.0),),
    "voxel": (("foreground_sampling", ForegroundSampling.VOXEL),),
    "paste-forced": (("paste_into", PasteInto.FORCED),),  # pasting in place of part of the forced share
}


def _recipe_variants(scratch: Arm) -> list[Arm]:
    """RADFED_BENCH_PRIVACY_VARIANTS, e.g. "no-paste,voxel+no-paste": no-DP arms from random weights, each with
    those recipe changes (RECIPE_VARIANTS), beside the plain no-DP arm."""
    arms = []
    for variant in filter(None, os.environ.get(VARIANTS_ENV, "").split(",")):
        parts = variant.split("+")
        unknown = [p for p in parts if p not in RECIPE_VARIANTS]
        if unknown:
            raise SystemExit(f"{VARIANTS_ENV}: unknown {unknown}; choose from {sorted(RECIPE_VARIANTS)}")
        changes = tuple(change for part in parts for change in RECIPE_VARIANTS[part])
        arms.append(replace(scratch, name=f"no DP, {variant}", recipe=changes))
    return arms


def _fine_tunings() -> list[tuple[TrainableScope, float]]:
    """RADFED_BENCH_PRIVACY_TUNED, e.g. "all@1e-4,norms@1e-3": each entry a family of fine-tuned arms (no DP and
    every epsilon) updating that scope (run-config trainable) at that learning rate; default: all at 1e-4."""
    chosen = os.environ.get(TUNED_ENV, f"all@{FINE_TUNE_LEARNING_RATE:g}")
    families = [entry.split("@") for entry in chosen.split(",") if entry]
    return [(TrainableScope(scope), float(rate)) for scope, rate in families]


def privacy_curve(work: Path, quick: bool) -> None:
    """What a privacy budget costs at a given cohort size: Dice of the federated model at epsilon 1, 2, 4, 8
    and without DP, for 12, 40 and 100 studies per site (3 synthetic sites, same rounds and steps). DP noise is
    calibrated to the sampling rate, so more studies per site means less noise per step for the same epsilon.

    Beside each from-scratch arm, the same job fine-tuning a base model trained centrally without DP on public
    studies from two other scanners (the base-model run-config key, as the demo does), and that base model
    as it is: whether DP fine-tuning keeps what the sites teach at a budget where DP from scratch learns
    nothing. RADFED_BENCH_PRIVACY_BASE_STEPS=0 leaves the base arms out; RADFED_BENCH_PRIVACY_SCRATCH_DP=0 leaves
    out the DP arms from random weights (they learned nothing at 100 studies per site, and fewer studies mean more
    noise per step), keeping the no-DP arm the ratios divide by."""
    sizes = (6,) if quick else tuple(int(s) for s in os.environ.get("RADFED_BENCH_PRIVACY_STUDIES", "").split(",") if s)
    sizes = sizes or PRIVACY_COHORTS
    rounds = int(os.environ.get("RADFED_BENCH_PRIVACY_ROUNDS", 2 if quick else 8))
    local_steps = int(os.environ.get("RADFED_BENCH_PRIVACY_LOCAL_STEPS", 3 if quick else 30))
    budget = Budget(rounds=rounds, local_steps=local_steps, every_round=quick)
    chosen = os.environ.get("RADFED_BENCH_PRIVACY_EPSILONS", "")  # e.g. "8": the no-DP arm and epsilon 8 only
    epsilons = tuple(float(e) for e in chosen.split(",") if e) or PRIVACY_EPSILONS
    base_steps = int(os.environ.get("RADFED_BENCH_PRIVACY_BASE_STEPS", 4 if quick else BASE_STEPS))
    scratch_dp = os.environ.get("RADFED_BENCH_PRIVACY_SCRATCH_DP", "1") != "0"
    # The coordinator's step for the arms from random weights (unset: the job's default, plain FedAvg since
    # session 27; the curve's first runs, session 15, had 2, which short jobs from random weights favour).
    server_step = os.environ.get("RADFED_BENCH_PRIVACY_SERVER_LR")
    scratch = Arm("no DP", server_learning_rate=float(server_step)) if server_step else Arm("no DP")
    arms = [scratch] + ([replace(scratch, name=f"DP epsilon {e:g}", epsilon=e) for e in epsilons] if scratch_dp else [])
    arms += _recipe_variants(scratch)
    base_arms = [Arm("base model only", Mode.BASE_ONLY)]
    for scope, rate in _fine_tunings():
        label = "" if (scope, rate) == (TrainableScope.ALL, FINE_TUNE_LEARNING_RATE) else f" ({scope}, lr {rate:g})"
        tuned = Arm(f"no DP, fine-tuned{label}", start=Start.BASE, learning_rate=rate, trainable=scope)
        base_arms += [tuned]
        base_arms += [replace(tuned, name=f"DP epsilon {e:g}, fine-tuned{label}", epsilon=e) for e in epsilons]
    public = _public_studies(work, quick)
    plan: list[tuple[int, Path, Arm]] = []
    bases: dict[int, Future[Path]] = {}
    for size in sizes:
        data = work / f"data-{size}"
        synthesize_to_folder(data, sites=len(PRIVACY_SITES), studies_per_site=size, seed=5, small=True)
        plan += [(size, data, arm) for arm in arms]
    jobs = int(os.environ.get("RADFED_BENCH_JOBS", min(len(plan), os.cpu_count() or 1)))
    context = multiprocessing.get_context("spawn")
    results = {}
    with ProcessPoolExecutor(jobs, context, initializer=_one_thread if jobs > 1 else None) as pool:
        if base_steps > 0:
            for size in sizes:
                bases[size] = pool.submit(_train_privacy_base, work / f"data-{size}", public, base_steps, work)
        futures = [pool.submit(_run_privacy_arm, data, budget, arm) for _, data, arm in plan]
        for size, training in bases.items():
            base = training.result()
            plan += [(size, work / f"data-{size}", arm) for arm in base_arms]
            futures += [pool.submit(_run_privacy_arm, work / f"data-{size}", budget, arm, base) for arm in base_arms]
        for (size, _, arm), future in zip(plan, futures, strict=True):
            results[(size, arm.name)] = future.result()
            # each arm as it ends: at 100 studies per site an arm takes the better part of an hour on one core
            pooled = results[(size, arm.name)].pooled
            print(
                f"  {size} studies per site, {arm.name}: Dice {_f(pooled.get('dice'))}, FP components / study "
                f"{_f(pooled.get('fp_components_per_study'))}, predicted / true volume "
                f"{_f(pooled.get('volume_ratio'))}; "
                f"calibrated: Dice {_f(pooled.get('calibrated_dice'))}, FP components / study "
                f"{_f(pooled.get('calibrated_fp_components_per_study'))}"
            )
    rows = []
    for size in sizes:
        clean = results[(size, "no DP")].pooled.get("dice")
        for arm in arms + (base_arms if base_steps > 0 else []):
            pooled = results[(size, arm.name)].pooled
            dice = pooled.get("dice")
            where = [_f(pooled.get("fp_components_per_study")), _f(pooled.get("volume_ratio"))]
            calibrated = [_f(pooled.get(f"calibrated_{k}")) for k in CALIBRATED_FIGURES]
            rows.append(
                [size, arm.name, _f(dice), _f(_ratio_of(dice, clean)), _f(pooled.get("auc")), *where, *calibrated]
            )
    table(
        f"Privacy curve: federated Dice by budget and cohort size (3 synthetic sites, {budget.rounds} rounds x "
        f"{budget.local_steps} steps, delta 1e-5 per site, coordinator step {scratch.server_learning_rate:g} from "
        f"random weights; fine-tuned: from a base model trained {base_steps} "
        f"steps without DP on {2 * (3 if quick else PUBLIC_STUDIES // 2)} public studies of two other scanners, "
        f"learning rate {FINE_TUNE_LEARNING_RATE:g}; calibrated: the job's output calibration, its settings chosen on "
        "every other test study and applied to the rest)",
        [
            "studies per site",
            "arm",
            "Dice",
            "Dice / no DP from scratch (goal at eps 8, 100 studies: >= 0.8)",
            "AUC",
            "FP components / study",
            "predicted / true volume",
            "calibrated: Dice",
            "calibrated: FP / study",
            "calibrated: volume",
        ],
        rows,
        f"RADFED_BENCH_FEDERATION=privacy RADFED_BENCH_PRIVACY_STUDIES={','.join(map(str, sizes))} "
        + (
            ""
            if (rounds, local_steps) == (8, 30)
            else f"RADFED_BENCH_PRIVACY_ROUNDS={rounds} RADFED_BENCH_PRIVACY_LOCAL_STEPS={local_steps} "
        )
        + (f"RADFED_BENCH_PRIVACY_EPSILONS={chosen} " if chosen else "")
        + ("" if scratch_dp else "RADFED_BENCH_PRIVACY_SCRATCH_DP=0 ")
        + ("" if base_steps == (4 if quick else BASE_STEPS) else f"RADFED_BENCH_PRIVACY_BASE_STEPS={base_steps} ")
        + (f"RADFED_BENCH_PRIVACY_SERVER_LR={server_step} " if server_step else "")
        + (f"{VARIANTS_ENV}={variants} " if (variants := os.environ.get(VARIANTS_ENV)) else "")
        + (f"{TUNED_ENV}={tunings} " if (tunings := os.environ.get(TUNED_ENV)) else "")
        + "python -m bench federation",
    )


COMPRESSIONS = ("none", "fp16", "int8", "topk:0.1")


def compression(work: Path, quick: bool) -> None:
    """What update compression saves and costs, side by side on the same studies and test set: the bytes a
    site sends per round (the payload as it travels; the coordinator's ``bytes_up``) and the federated Dice,
    for each setting. Sizes: RADFED_BENCH_COMPRESSION_STUDIES, _ROUNDS, _STEPS."""
    studies = int(os.environ.get("RADFED_BENCH_COMPRESSION_STUDIES", 4 if quick else 8))
    rounds = int(os.environ.get("RADFED_BENCH_COMPRESSION_ROUNDS", 2 if quick else 4))
    steps = int(os.environ.get("RADFED_BENCH_COMPRESSION_STEPS", 3 if quick else 15))
    budget = Budget(rounds=rounds, local_steps=steps, every_round=False)
    spec, cohorts = _synthetic_sites(work, studies)
    arms = [Arm(f"federated, compression {c}", compression=c) for c in COMPRESSIONS]
    results = _run_arms(spec, cohorts, budget, arms)
    full = results[0].bytes_up
    clean = results[0].pooled.get("dice")
    rows = []
    for arm, result in zip(arms, results, strict=True):
        dice = result.pooled.get("dice")
        rows.append(
            [
                arm.compression,
                _f(dice),
                _f(_ratio_of(dice, clean)),
                f"{(result.bytes_up or 0) / 1e3:.0f}",
                f"{full / result.bytes_up:.1f}x" if full and result.bytes_up else "n/a",
                ",".join(sorted(set(result.flagged))) or "-",
            ]
        )
    table(
        f"Update compression (3 small synthetic sites x {studies} studies, {rounds} rounds x {steps} steps, no DP; "
        "the same held-out studies for every setting; one seed)",
        ["compression", "Dice", "Dice / none", "kB up per site per round", "smaller by", "flagged"],
        rows,
        f"RADFED_BENCH_FEDERATION=compression RADFED_BENCH_COMPRESSION_STUDIES={studies} "
        f"RADFED_BENCH_COMPRESSION_ROUNDS={rounds} RADFED_BENCH_COMPRESSION_STEPS={steps} python -m bench federation",
    )


def stragglers(work: Path, quick: bool) -> None:
    """A straggler (site-3's update arrives 2 rounds late): waiting for it every round, against rounds that close
    at the quorum with its late update dropped or folded (staleness-weighted, rebased; run-config late-updates), on
    the same studies, splits and rounds. The coordinator's time is in units of one round of the prompt sites.
    Sizes: RADFED_BENCH_STRAGGLER_STUDIES, _ROUNDS, _STEPS, _LATE."""
    studies = int(os.environ.get("RADFED_BENCH_STRAGGLER_STUDIES", 4 if quick else 8))
    rounds = int(os.environ.get("RADFED_BENCH_STRAGGLER_ROUNDS", 3 if quick else 8))
    steps = int(os.environ.get("RADFED_BENCH_STRAGGLER_STEPS", 3 if quick else 15))
    late = int(os.environ.get("RADFED_BENCH_STRAGGLER_LATE", 2))
    budget = Budget(rounds=rounds, local_steps=steps, every_round=False)
    spec, cohorts = _synthetic_sites(work, studies)
    arms = [
        Arm("wait for every site", straggler="site-3", late_by=late),
        Arm("quorum, late update dropped", straggler="site-3", late_by=late, late_updates=LateUpdates.DROP),
        Arm("quorum, late update folded", straggler="site-3", late_by=late, late_updates=LateUpdates.FOLD),
    ]
    results = _run_arms(spec, cohorts, budget, arms)
    clean = results[0].pooled.get("dice")
    rows = [
        [
            arm.name,
            _f(result.pooled.get("dice")),
            _f(_ratio_of(result.pooled.get("dice"), clean)),
            _f(result.pooled.get("auc")),
            str(result.time_units),
            str(len(result.late)),
        ]
        for arm, result in zip(arms, results, strict=True)
    ]
    table(
        f"Stragglers (3 small synthetic sites x {studies} studies, {rounds} rounds x {steps} steps, no DP; site-3's "
        f"update {late} rounds late; the same held-out studies for every arm; one seed)",
        ["arm", "Dice", "Dice / waiting", "AUC", "coordinator time (rounds of the prompt sites)", "late updates"],
        rows,
        f"RADFED_BENCH_FEDERATION=stragglers RADFED_BENCH_STRAGGLER_STUDIES={studies} "
        f"RADFED_BENCH_STRAGGLER_ROUNDS={rounds} RADFED_BENCH_STRAGGLER_STEPS={steps} "
        f"RADFED_BENCH_STRAGGLER_LATE={late} python -m bench federation",
    )


def _synthetic_sites(work: Path, studies: int) -> tuple[TaskSpec, dict[str, SiteCohort]]:
    """3 small synthetic sites (seed 5) and their cohorts under one plan, as the bench's side-by-side tables use."""
    synthesize_to_folder(work / "data", sites=3, studies_per_site=studies, seed=5, small=True)
    spec = load_task_spec(None)
    cohorts = load_site_cohorts({p.name: p for p in sorted((work / "data").glob("site-*"))}, spec, work / "cache")
    return spec, cohorts


def _run_arms(spec: TaskSpec, cohorts: dict[str, SiteCohort], budget: Budget, arms: list[Arm]) -> list[ArmResult]:
    """Every arm in its own spawned worker (RADFED_BENCH_JOBS at a time, one torch thread each), in order."""
    jobs = int(os.environ.get("RADFED_BENCH_JOBS", min(len(arms), os.cpu_count() or 1)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, context, initializer=_one_thread if jobs > 1 else None) as pool:
        return [f.result() for f in [pool.submit(_run_arm, spec, cohorts, budget, arm) for arm in arms]]


def _ratio_of(value: object, reference: object) -> float | None:
    if isinstance(value, float) and isinstance(reference, float) and reference:
        return value / reference
    return None


MEMBERSHIP_ARMS = (Arm("federated, no DP"), Arm("federated, DP eps 8", epsilon=8.0))
# From a base model trained without DP on public studies (as the privacy curve and the demo do): a DP job that
# learns, so that its leakage is measured on a model that fits the sites' studies. The base model alone is the
# control: it never saw a site's study, so its AUC is what the attack reads from the split alone.
MEMBERSHIP_BASE_ONLY = Arm("base model only (control)", Mode.BASE_ONLY)
MEMBERSHIP_BASE_ARMS = (
    Arm("fine-tuned, no DP", start=Start.BASE, learning_rate=FINE_TUNE_LEARNING_RATE),
    Arm("fine-tuned, DP eps 8", epsilon=8.0, start=Start.BASE, learning_rate=FINE_TUNE_LEARNING_RATE),
)
References = tuple[Any, Any] | None  # (confidences, trained halves), both (references, studies)


def membership(work: Path, quick: bool) -> None:
    """What an attacker holding the final model learns about who trained it: each site's audit as a job runs it
    (run-config membership-audit = lira: loss threshold + offline LiRA on its training vs held-out studies), on the
    federated model without DP and with DP at epsilon 8, from random weights and fine-tuned from a public base
    model, on the same studies and splits. The reference models are trained at the site, without DP, on halves of
    its studies, as a site trains them: from random weights for the arms from random weights, and fine-tuned from
    the base (at the fine-tuning learning rate) for the arms from the base and the control; so each site trains
    two sets. Every worker loads the cohorts from the cohort cache (sent from the parent, 3 x 64 studies would be
    pickled for every task). Sizes:
    RADFED_BENCH_MEMBERSHIP_STUDIES, _ROUNDS, _STEPS, _REFERENCES, _BASE_STEPS (0: no base arms); held-out
    fraction 0.5. One plan for every arm, the DP job's (batches of >= 8)."""
    environ = os.environ.get
    studies = int(environ("RADFED_BENCH_MEMBERSHIP_STUDIES", 4 if quick else 8))
    rounds = int(environ("RADFED_BENCH_MEMBERSHIP_ROUNDS", 2 if quick else 4))
    steps = int(environ("RADFED_BENCH_MEMBERSHIP_STEPS", 3 if quick else 15))
    references = int(environ("RADFED_BENCH_MEMBERSHIP_REFERENCES", 2 if quick else 4))
    base_steps = int(environ("RADFED_BENCH_MEMBERSHIP_BASE_STEPS", 4 if quick else BASE_STEPS))
    budget = Budget(rounds=rounds, local_steps=steps, held_out_fraction=0.5, every_round=False)
    data = work / "data"
    synthesize_to_folder(data, sites=3, studies_per_site=studies, seed=5, small=True)
    roots = {p.name: p for p in sorted(data.glob("site-*"))}
    # planned once, here: a plan from the fingerprint loads every study
    spec = planned_spec(roots, load_task_spec(None), private=True)
    sites = sorted(_membership_cohorts(data, spec))  # builds the cohort cache the workers read
    public = _public_studies(work, quick) if base_steps > 0 else []
    settings = AuditSettings(MembershipAudit.LIRA, references, rounds * steps)  # as a site would train them
    jobs = int(os.environ.get("RADFED_BENCH_JOBS", os.cpu_count() or 1))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, context, initializer=_one_thread if jobs > 1 else None) as pool:
        training = pool.submit(train_base_model, spec, public, base_steps) if public else None
        arm_runs = {arm: pool.submit(_membership_arm, data, spec, budget, arm) for arm in MEMBERSHIP_ARMS}
        reference_runs = {s: pool.submit(_site_references, data, spec, budget, s, settings) for s in sites}
        base = training.result() if training is not None else None
        final: dict[Arm, Any] = {}
        base_arms: tuple[Arm, ...] = ()
        base_reference_runs = {}
        if base is not None:
            final[MEMBERSHIP_BASE_ONLY] = base  # the control's model: the base itself
            base_arms = (MEMBERSHIP_BASE_ONLY, *MEMBERSHIP_BASE_ARMS)
            arm_runs |= {arm: pool.submit(_membership_arm, data, spec, budget, arm, base) for arm in base_arms}
            tuned = replace(settings, learning_rate=FINE_TUNE_LEARNING_RATE, initial=base)
            base_reference_runs = {s: pool.submit(_site_references, data, spec, budget, s, tuned) for s in sites}
        results = {arm: future.result() for arm, future in arm_runs.items()}
        final |= {arm: r.final_arrays for arm, r in results.items() if r.final_arrays is not None}
        loss_runs = {
            (arm, site): pool.submit(_site_losses, data, spec, budget, site, arrays)
            for arm, arrays in final.items()
            for site in sites
        }
        reference = {site: f.result() for site, f in reference_runs.items()}
        base_reference = {site: f.result() for site, f in base_reference_runs.items()}
        losses = {key: f.result() for key, f in loss_runs.items()}
    rows = []
    for arm, result in results.items():
        pooled: dict[str, list[Any]] = {"loss_in": [], "loss_out": [], "lira_in": [], "lira_out": []}
        for site in sites:
            site_losses, members = losses[(arm, site)]
            site_reference = (base_reference if arm in base_arms else reference)[site]
            if site_reference is None or not 0 < members < len(site_losses):  # no split to attack
                rows.append([arm.name, site, members, len(site_losses) - members, *["n/a"] * 5])
                continue
            loss = loss_scores(site_losses)
            lira = lira_offline_scores(logit_confidence(site_losses), *site_reference)
            pooled["loss_in"] += list(loss[:members])
            pooled["loss_out"] += list(loss[members:])
            pooled["lira_in"] += list(lira[:members])
            pooled["lira_out"] += list(lira[members:])
            rows.append(_membership_row(arm.name, site, loss, lira, members, result))
        rows.append(
            _membership_row(
                arm.name,
                "all sites",
                pooled["loss_in"] + pooled["loss_out"],
                pooled["lira_in"] + pooled["lira_out"],
                len(pooled["loss_in"]),
                result,
            )
        )
    public_count = len(public) * (3 if quick else PUBLIC_STUDIES // 2)
    base_text = (
        f"; fine-tuned from a base model of {base_steps} steps on {public_count} public studies" if public else ""
    )
    table(
        f"Membership inference against the federated model (3 small synthetic sites x {studies} studies, half held "
        f"out; {rounds} rounds x {steps} steps; LiRA offline with {references} reference models of {rounds * steps} "
        f"steps per site, trained as the arm's model was (from random weights or from the base){base_text}; "
        "'all sites': the sites' scores pooled; one seed)",
        ["arm", "site", "members", "non-members", "loss AUC", "loss TPR@1%FPR", "LiRA AUC", "LiRA TPR@1%FPR", "Dice"],
        rows,
        f"RADFED_BENCH_FEDERATION=membership RADFED_BENCH_MEMBERSHIP_STUDIES={studies} "
        f"RADFED_BENCH_MEMBERSHIP_ROUNDS={rounds} RADFED_BENCH_MEMBERSHIP_STEPS={steps} "
        f"RADFED_BENCH_MEMBERSHIP_REFERENCES={references} RADFED_BENCH_MEMBERSHIP_BASE_STEPS={base_steps} "
        "python -m bench federation",
    )
    print("goal: membership-inference AUC <= 0.55 at epsilon 8 (0.5 is chance; few studies per site: coarse AUCs)")


def _membership_row(arm: str, site: str, loss: Any, lira: Any, members: int, result: ArmResult) -> list[object]:
    by_loss = evaluate_attack(loss[:members], loss[members:])
    by_lira = evaluate_attack(lira[:members], lira[members:])
    return [
        arm, site, by_loss.members, by_loss.non_members, _f(by_loss.auc), _f(by_loss.tpr_at_low_fpr),
        _f(by_lira.auc), _f(by_lira.tpr_at_low_fpr), _f(result.pooled.get("dice")),
    ]  # fmt: skip


def _membership_cohorts(data: Path, spec: TaskSpec) -> dict[str, SiteCohort]:
    """The membership bench's cohorts under ``spec`` (planned), from (and into) the cohort cache beside ``data``."""
    return load_site_cohorts({p.name: p for p in sorted(data.glob("site-*"))}, spec, data.parent / "cache")


def _membership_arm(data: Path, spec: TaskSpec, budget: Budget, arm: Arm, base: Any = None) -> ArmResult:
    return Experiment(spec, _membership_cohorts(data, spec), budget, base).run(arm)


def _site_split(cohorts: dict[str, SiteCohort], budget: Budget, site: str) -> tuple[list[Any], int]:
    """A site's studies as its audit sees them: its training studies (members) first, then its held-out ones,
    harmonised as the experiment's federated arms train on them."""
    landmarks = Experiment(cohorts[site].spec, cohorts, budget).landmarks
    train, held_out = cohorts[site].split(budget.held_out_fraction, landmarks)
    return [*train, *held_out], len(train)


def _site_references(data: Path, spec: TaskSpec, budget: Budget, site: str, settings: AuditSettings) -> References:
    cohorts = _membership_cohorts(data, spec)
    studies, _ = _site_split(cohorts, budget, site)
    return reference_confidences(studies, cohorts[site].spec, settings) if len(studies) >= 2 else None


def _site_losses(data: Path, spec: TaskSpec, budget: Budget, site: str, arrays: Any) -> tuple[Any, int]:
    cohorts = _membership_cohorts(data, spec)
    studies, members = _site_split(cohorts, budget, site)
    planned = cohorts[site].spec
    return study_losses(arrays_to_model(planned, arrays), studies, planned), members


def _run_arm(spec: TaskSpec, cohorts: dict[str, SiteCohort], budget: Budget, arm: Arm) -> ArmResult:
    return Experiment(spec, cohorts, budget).run(arm)


def _run_privacy_arm(data: Path, budget: Budget, arm: Arm, base: Path | None = None) -> ArmResult:
    """One arm of the privacy curve, its cohorts loaded in the worker: sent from the parent, 3 sites x 100
    studies cost each worker 5.4 GB and two workers beside the parent's copy ran a 23 GB machine out of memory.
    ``base``: the base model's weights (an arm that starts from it runs under the plan it was trained for)."""
    roots = {p.name: p for p in sorted(data.glob("site-*"))}
    # planned as the coordinator plans the job: a DP job keeps batches of >= 8 (inference/model/plan.py); the
    # base model is trained under the private plan so that every fine-tuned arm shares its network
    private = bool(arm.epsilon) or base is not None
    cohorts = load_site_cohorts(roots, load_task_spec(None), private=private)
    weights = None
    if base is not None:
        with np.load(base) as saved:
            weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    return Experiment(next(iter(cohorts.values())).spec, cohorts, budget, weights).run(arm)


def _train_privacy_base(data: Path, public: list[Path], steps: int, work: Path) -> Path:
    """The base model for the privacy curve's cohort under ``data``: the DP job's plan, public studies only."""
    roots = {p.name: p for p in sorted(data.glob("site-*"))}
    spec = planned_spec(roots, load_task_spec(None), private=True)
    out = work / f"base-{data.name}.npz"
    np.savez(out, *train_base_model(spec, public, steps))
    return out


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _mean(values: list[object]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, float | int)]
    return statistics.mean(numbers) if numbers else None


def _spread(values: list[object]) -> str:
    numbers = [float(v) for v in values if isinstance(v, float | int)]
    if not numbers:
        return "n/a"
    if len(numbers) == 1:
        return f"{numbers[0]:.3f}"
    return f"{statistics.mean(numbers):.3f} ({min(numbers):.3f}-{max(numbers):.3f})"


def _ratio(means: dict[str, dict[str, float | None]], numerator: str, denominator: str, key: str) -> float | None:
    a, b = means.get(numerator, {}).get(key), means.get(denominator, {}).get(key)
    return a / b if a is not None and b else None


OVERHEAD_PARTS = ("flower_transport", "clientapp_start", "clientapp_forwarding", "site_worker_other")


def transport(work: Path, quick: bool) -> None:
    """Round wall time on real Flower processes, split into the slowest site's compute and the rest, for
    a light and a heavier round (the overhead is fixed; its share falls as compute grows), with radfed's
    warm SuperExec and SuperNode intervals (site/supernode.py), with Flower's SuperNode intervals (3 s idle pull,
    30 s heartbeat) and with Flower's own SuperExec too (a new flwr-clientapp process per message), in one run."""
    rows = []
    flower_intervals = {"idle_pull_s": FLOWER_IDLE_PULL_S, "heartbeat_s": FLOWER_HEARTBEAT_S}
    arms: list[tuple[str, str, dict[str, Any]]] = [
        ("radfed warm SuperExec, SuperNode pulling every 0.25 s", "warm", {}),
        ("radfed warm SuperExec, Flower's SuperNode intervals", "warm-3s", flower_intervals),
        ("Flower's SuperExec and SuperNode intervals", "flower", {"warm_clientapp": False, **flower_intervals}),
    ]
    for label, slug, settings in arms:
        options = FederationOptions(sites=3, studies_per_site=4, seed=2, secure=True, **settings)
        federation = LoopbackFederation(work / f"fed-{slug}", ROOT / "deploy" / "flower", options)
        federation.start()
        try:
            for steps in (3, 10) if quick else (10, 40):
                job = work / f"job-{slug}-{steps}"
                outcome = federation.run_job(
                    job,
                    {
                        "num-server-rounds": 2 if quick else 4,
                        "local-steps": steps,
                        "min-sites": 3,
                        "epsilon": 0.0,
                        "harmonise": True,
                        "rollout": False,
                        "job": f"bench-transport-{slug}-{steps}",
                    },
                )
                assert outcome.ok, outcome.log[-2000:]
                rows += [[label, steps, *_round_cells(m)] for m in read_metrics(job) if "round" in m]
        finally:
            federation.stop()
    table(
        "Federated rounds on real Flower processes (3 SuperNodes with their site workers, TLS + node auth, no DP)",
        [
            "ClientApp processes",
            "local steps",
            "round",
            "wall s",
            "site compute s (slowest site)",
            "overhead s",
            "overhead / compute",
            "of which: Flower transport s",
            "ClientApp process start s",
            "forwarding s",
            "site worker other s",
            "kB down/site",
            "kB up/site",
        ],
        rows,
        "python -m bench federation",
    )


def secure(work: Path, quick: bool) -> None:
    """What secure aggregation costs, on real Flower processes: the same job (3 sites, TLS + node auth, the same
    studies, seed and steps, no DP) with plain FedAvg and with SecAgg+, one after the other on one federation:
    round wall time and its overhead beyond the slowest site's compute, what each site sends, how often a site's
    update was clipped, and the final model's pooled Dice on the held-out studies."""
    rounds, steps, studies = (2, 5, 6) if quick else (6, 20, 12)
    options = FederationOptions(sites=3, studies_per_site=studies, seed=2, secure=True)
    federation = LoopbackFederation(work / "fed", ROOT / "deploy" / "flower", options)
    federation.start()
    rows = []
    try:
        for label, on in (("plain FedAvg", False), ("SecAgg+ (secure-aggregation = true)", True)):
            job = work / f"job-{on}"
            config = {
                "num-server-rounds": rounds,
                "local-steps": steps,
                "min-sites": 3,
                "epsilon": 0.0,
                "secure-aggregation": on,
                "rollout": False,
                "membership-audit": "off",
                "job": f"bench-secure-{on}",
            }
            outcome = federation.run_job(job, config)
            assert outcome.ok, outcome.log[-2000:]
            metrics = read_metrics(job)
            lines = [m for m in metrics if "round" in m]
            final = next(m for m in metrics if m.get("stage") == "final")
            pooled = (final.get("evaluation") or {}).get("pooled", {})
            sites = [site for m in lines for site in m["sites"].values()]
            rows.append(
                [
                    label,
                    f"{statistics.mean(m['seconds'] for m in lines):.1f}",
                    f"{statistics.mean(m['overhead_seconds'] for m in lines):.1f}",
                    f"{statistics.mean(s['bytes_up'] for s in sites) / 1e3:.0f}",
                    f"{sum(s.get('update_clipped', 0.0) for s in sites):.0f} / {len(sites)}" if on else "n/a",
                    _f(pooled.get("dice")),
                ]
            )
    finally:
        federation.stop()
    table(
        f"Secure aggregation on real Flower processes (3 SuperNodes, TLS + node auth, {studies} synthetic studies per "
        f"site, {rounds} rounds x {steps} steps, no DP; mean over rounds)",
        ["aggregation", "round wall s", "overhead s", "kB up per site per round", "updates clipped", "final Dice"],
        rows,
        f"RADFED_BENCH_FEDERATION=secure{' RADFED_BENCH_QUICK=1' if quick else ''} python -m bench federation",
    )


def _round_cells(m: dict[str, Any]) -> list[object]:
    parts = m.get("overhead_parts", {})
    up = statistics.mean(s["bytes_up"] for s in m["sites"].values())
    down = statistics.mean(s["bytes_down"] for s in m["sites"].values())
    return [
        m["round"],
        f"{m['seconds']:.1f}",
        f"{m['site_compute_seconds']:.1f}",
        f"{m['overhead_seconds']:.1f}",
        f"{m['overhead_seconds'] / max(m['site_compute_seconds'], 1e-9):.0%}",
        *(f"{parts.get(k, 0.0):.1f}" for k in OVERHEAD_PARTS),
        f"{down / 1e3:.0f}",
        f"{up / 1e3:.0f}",
    ]


def _f(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


SCALE_SITES = (10, 30, 100)
SCALE_PER_ROUND = 10


def scale(work: Path, quick: bool) -> None:
    """The coordinator's cost as the consortium grows, on Flower's simulation runtime (Ray) with the
    deployment's ServerApp and ClientApp: N = 10, 30, 100 simulated hospitals (long-tailed cohorts of 2-12
    small studies, vendor profiles cycling), K = 10 asked per training round. Each N runs in its own process
    (its own Ray instance); the data of N = 10 is the first 10 sites of N = 100. Coordinator seconds are the
    ServerApp thread's own CPU time (packing, screening, aggregation), not its waiting on the sites."""
    sites = (4, 6) if quick else tuple(int(n) for n in os.environ.get("RADFED_BENCH_SCALE_SITES", "").split(",") if n)
    sites = sites or SCALE_SITES
    per_round = 2 if quick else int(os.environ.get("RADFED_BENCH_SCALE_PER_ROUND", SCALE_PER_ROUND))
    rounds, steps = (2, 2) if quick else (3, 5)
    sizes = CohortSizes(smallest=2, largest=12).draw(max(sites), seed=0)
    synthesize_sites(work, sizes, seed=0)
    rows: list[list[object]] = []
    cpu: list[float] = []  # the coordinator's CPU seconds per round, by N
    context = multiprocessing.get_context("spawn")
    for n in sites:
        simulation = Simulation(
            work / f"n-{n}",
            n,
            per_round,
            rounds=rounds,
            local_steps=steps,
            workers=os.cpu_count() or 1,
            run_config={"task": "prostate_bpmri_highgrade", "harmonise": False, "round-timeout": 3600.0},
        )
        (simulation.root / "sites").mkdir(parents=True, exist_ok=True)
        for index in range(n):  # the shared data, linked: one copy of the studies for every N
            site = simulated_site_name(index)
            link = simulation.root / "sites" / site
            if not link.exists():
                link.symlink_to(work / "sites" / site, target_is_directory=True)
        started = time.perf_counter()
        with ProcessPoolExecutor(1, context) as pool:
            lines = pool.submit(run_simulation, simulation).result()
        wall = time.perf_counter() - started
        costs = round_costs(lines)
        final = final_evaluation(lines)
        cpu.append(statistics.mean(c.coordinator_cpu_seconds for c in costs))
        rows.append(
            [
                n,
                per_round,
                sum(sizes[:n]),
                _f(cpu[-1]),
                _f(_ratio_of(cpu[-1], cpu[0])),
                _f(statistics.mean(c.seconds for c in costs)),
                f"{max(c.coordinator_peak_rss_mb for c in costs):.0f}",
                f"{statistics.mean(c.bytes_per_round for c in costs) / 1e6:.1f}",
                _f(final.get("dice")),
                f"{wall:.0f}",
            ]
        )
        print(f"  N = {n}: {rows[-1]}")
    table(
        f"Scale on Flower's simulation runtime: K = {per_round} of N sites per round, {rounds} rounds x {steps} "
        f"steps, task prostate_bpmri_highgrade, no DP, {os.cpu_count()} Ray actors",
        [
            "sites N",
            "asked K",
            "studies",
            "coordinator CPU s / round",
            "vs smallest N (goal at N=100: < 2)",
            "round seconds",
            "coordinator peak RSS MB",
            "MB per round",
            "final Dice (every site's held-out)",
            "job seconds",
        ],
        rows,
        f"RADFED_BENCH_FEDERATION=scale RADFED_BENCH_SCALE_SITES={','.join(map(str, sites))} "
        f"RADFED_BENCH_SCALE_PER_ROUND={per_round} python -m bench federation",
    )


def main() -> None:
    quick = os.environ.get("RADFED_BENCH_QUICK") == "1"
    parts = os.environ.get("RADFED_BENCH_FEDERATION", "quality,transport").split(",")
    with tempfile.TemporaryDirectory(prefix="radfed-bench-fed-") as tmp:
        if "quality" in parts:
            quality(Path(tmp) / "quality", quick)
        if "transport" in parts:
            transport(Path(tmp) / "transport", quick)
        if "privacy" in parts:
            privacy_curve(Path(tmp) / "privacy", quick)
        if "compression" in parts:
            compression(Path(tmp) / "compression", quick)
        if "membership" in parts:
            membership(Path(tmp) / "membership", quick)
        if "stragglers" in parts:
            stragglers(Path(tmp) / "stragglers", quick)
        if "scale" in parts:
            scale(Path(tmp) / "scale", quick)
        if "secure" in parts:
            secure(Path(tmp) / "secure", quick)
        if "reconstruction" in parts:
            from bench.reconstruction import reconstruction

            reconstruction(quick)


if __name__ == "__main__":
    main()
