"""``radfed federation local``: a whole federation on this machine (N hospitals with their own Orthanc and
synthetic studies, a coordinator, TLS and node authentication), one job, a summary, then everything stops.
``radfed federation simulate``: many simulated hospitals on Flower's simulation runtime (Ray), the same apps."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def find_app_dir(given: Path | None) -> Path:
    """The Flower app folder: the one given, else the installed package's, else this checkout's deploy/flower.

    The installed copy is package data of ``radfed.deploy`` (importlib.resources), so a wheel install needs no
    checkout; the checkout is only a fallback for an environment installed before radfed.deploy shipped.
    """
    if given is not None:
        if (given / "pyproject.toml").is_file():
            return given
        raise SystemExit(f"radfed federation: {given} is not a Flower app folder (no pyproject.toml)")
    candidates = []
    try:
        from radfed.deploy import asset

        candidates.append(asset("flower"))
    except (ImportError, FileNotFoundError):
        pass
    candidates.append(Path(__file__).resolve().parents[2] / "deploy" / "flower")
    for candidate in candidates:
        if (candidate / "pyproject.toml").is_file():
            return candidate
    raise SystemExit("radfed federation: the Flower app (radfed.deploy flower/) is not installed; pass --app")


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {
        "num-server-rounds": args.rounds,
        "local-steps": args.local_steps,
        "min-sites": args.min_sites or args.sites,
        "epsilon": args.epsilon,
        "aggregation": args.aggregation,
        "proximal-mu": args.proximal_mu,
        "harmonise": not args.no_harmonise,
        "rollout": True,
        "round-timeout": args.round_timeout,
        "job": args.job,
        "model-version": args.model_version,
    }
    if args.server_learning_rate is not None:  # else the Flower app's default (deploy/flower/pyproject.toml)
        config["server-learning-rate"] = args.server_learning_rate
    if args.server_optimizer is not None:
        config["server-optimizer"] = args.server_optimizer
    return config


def summarise(out: Path) -> str:
    from radfed.federation.coordinator.checkpoint import read_metrics

    lines = ["round  seconds  site-compute  overhead  pooled Dice  pooled AUC  flagged"]
    evaluations = {m.get("evaluated_round"): m.get("evaluation") for m in read_metrics(out) if m.get("evaluation")}
    for m in read_metrics(out):
        if "round" not in m:
            continue
        ev = (evaluations.get(m["round"]) or {}).get("pooled", {})
        lines.append(
            f"{m['round']:>5}  {m['seconds']:7.1f}  {m['site_compute_seconds']:12.1f}  {m['overhead_seconds']:8.1f}  "
            f"{_fmt(ev.get('dice')):>11}  {_fmt(ev.get('auc')):>10}  {','.join(f['site'] for f in m['flagged']) or '-'}"
        )
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def cmd_federation_local(args: argparse.Namespace) -> int:
    from radfed.federation.lab.loopback import FederationOptions, LoopbackFederation

    workdir: Path = args.workdir.resolve()
    federation = LoopbackFederation(
        workdir,
        find_app_dir(args.app),
        FederationOptions(
            sites=args.sites,
            studies_per_site=args.studies_per_site,
            seed=args.seed,
            small=not args.full_size,
            secure=not args.insecure,
        ),
    )
    started = time.perf_counter()
    federation.start(progress=lambda step: print(f"starting: {step}", file=sys.stderr, flush=True))
    try:
        out = workdir / "job"
        print(f"job running; stream in {out / 'run.log'}", file=sys.stderr, flush=True)
        outcome = federation.run_job(out, run_config(args))
        print(summarise(out))
        if not outcome.ok:
            print(f"radfed federation: the job failed; last lines:\n{outcome.log[-2000:]}", file=sys.stderr)
            return 1
        print(f"\nmodel card: {out / 'model-card.md'}\nartifact:   {out / 'artifact'}")
        for site in federation.sites:
            print(f"{site.name}: Orthanc {site.orthanc.url} (user {site.orthanc.options.username}), "
                  f"model registry {site.models_dir}")  # fmt: skip
        print(f"total {time.perf_counter() - started:.0f} s")
        if args.keep:
            print("--keep: everything stays up; press Ctrl-C to stop", file=sys.stderr)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        federation.stop()
    return 0


def cmd_federation_simulate(args: argparse.Namespace) -> int:
    from radfed.federation.lab.simulation import (
        CohortSizes,
        Simulation,
        final_evaluation,
        round_costs,
        run,
        synthesize_sites,
    )

    root: Path = args.workdir.resolve()
    sizes = CohortSizes(args.smallest, args.largest).draw(args.sites, args.seed)
    print(f"{args.sites} sites, {sum(sizes)} studies (smallest {min(sizes)}, largest {max(sizes)})", file=sys.stderr)
    synthesize_sites(root, sizes, args.seed)
    extra: dict[str, bool | int | float | str] = {"task": args.task} if args.task else {}
    simulation = Simulation(
        root,
        args.sites,
        args.sites_per_round,
        rounds=args.rounds,
        local_steps=args.local_steps,
        epsilon=args.epsilon,
        seed=args.seed,
        workers=args.workers,
        run_config=extra,
    )
    started = time.perf_counter()
    lines = run(simulation)
    print("round  asked  seconds  coordinator CPU s  peak RSS MB  site compute s  MB moved")
    for cost in round_costs(lines):
        print(
            f"{cost.round:>5}  {cost.sites_asked:>5}  {cost.seconds:7.1f}  {cost.coordinator_cpu_seconds:17.3f}  "
            f"{cost.coordinator_peak_rss_mb:11.0f}  {cost.site_compute_seconds:14.1f}  "
            f"{cost.bytes_per_round / 1e6:8.1f}"
        )
    final = final_evaluation(lines)
    print(f"final model, every site's held-out studies: Dice {_fmt(final.get('dice'))}, AUC {_fmt(final.get('auc'))}")
    print(f"total {time.perf_counter() - started:.0f} s; metrics in {simulation.out / 'metrics.jsonl'}")
    return 0


def add_parser(commands: Any) -> None:
    federation = commands.add_parser("federation", help="federated training (a local federation for tests and demos)")
    sub = federation.add_subparsers(dest="federation_command", required=True, metavar="SUBCOMMAND")
    local = sub.add_parser("local", help="start N hospitals + a coordinator on loopback, run one job, stop")
    local.add_argument("--sites", type=int, default=3)
    local.add_argument("--studies-per-site", type=int, default=8)
    local.add_argument("--rounds", type=int, default=3)
    local.add_argument("--local-steps", type=int, default=10)
    local.add_argument("--min-sites", type=int, help="quorum (default: all sites)")
    local.add_argument("--epsilon", type=float, default=8.0, help="DP budget per site for the job (0: no DP)")
    local.add_argument("--aggregation", default="fedavg", choices=["fedavg", "median", "trimmed-mean", "multi-krum"])
    local.add_argument("--proximal-mu", type=float, default=0.0, help="> 0: FedProx")
    local.add_argument(
        "--server-learning-rate",
        type=float,
        help="the coordinator's step along the aggregated update (1: plain FedAvg)",
    )
    local.add_argument(
        "--server-optimizer",
        choices=["sgd", "adam", "yogi"],
        help="sgd: FedAvg / FedAvgM (default); adam / yogi: FedAdam / FedYogi (--server-learning-rate per coordinate)",
    )
    local.add_argument("--no-harmonise", action="store_true", help="skip federated intensity harmonisation")
    local.add_argument("--round-timeout", type=float, default=600)
    local.add_argument("--insecure", action="store_true", help="no TLS and no node authentication (never at sites)")
    local.add_argument("--full-size", action="store_true", help="full-size studies (slower)")
    local.add_argument("--seed", type=int, default=11)
    local.add_argument("--job", default="radfed-local-job")
    local.add_argument("--model-version", default="1.0.0")
    local.add_argument("--workdir", type=Path, default=Path("radfed-federation"))
    local.add_argument("--app", type=Path, help="the Flower app folder (default: deploy/flower)")
    local.add_argument("--keep", action="store_true", help="leave everything running until Ctrl-C")
    local.set_defaults(handler=cmd_federation_local)
    simulate = sub.add_parser(
        "simulate", help="N simulated hospitals on Flower's simulation runtime (Ray; pip install radfed[simulation])"
    )
    simulate.add_argument("--sites", type=int, default=10)
    simulate.add_argument("--sites-per-round", type=int, default=10, help="sites asked per training round (0: all)")
    simulate.add_argument("--rounds", type=int, default=3)
    simulate.add_argument("--local-steps", type=int, default=5)
    simulate.add_argument("--epsilon", type=float, default=0.0, help="DP budget per site for the job (0: no DP)")
    simulate.add_argument("--smallest", type=int, default=4, help="studies at the smallest site (long-tailed sizes)")
    simulate.add_argument("--largest", type=int, default=40, help="studies at the largest site")
    simulate.add_argument("--workers", type=int, default=0, help="sites training at once (0: this machine's cores)")
    simulate.add_argument("--task", help="a task spec's name or path (default: the shipped default task)")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--workdir", type=Path, default=Path("radfed-simulation"))
    simulate.set_defaults(handler=cmd_federation_simulate)
