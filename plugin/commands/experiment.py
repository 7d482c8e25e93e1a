"""``radfed experiment NAME``: the seeds' research questions side by side on the same synthetic hospitals,
printed as a table and written as a report (bar charts and per-round curves)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

NAMES = ("centralised-vs-federated", "harmonisation", "privacy", "poisoning", "all")


def cmd_experiment(args: argparse.Namespace) -> int:
    from radfed.federation.lab.experiments import (
        EXPERIMENTS,
        TABLE_HEADER,
        Budget,
        Experiment,
        load_site_cohorts,
        results_table,
    )
    from radfed.inference.model.taskspec import load_task_spec
    from radfed.inference.testing.synthetic.writer import synthesize_to_folder
    from radfed.plugin.tools.report import ReportWriter

    workdir: Path = args.workdir.resolve()
    data = workdir / "data"
    if not (data / "site-1" / "labels.csv").is_file():
        synthesize_to_folder(
            data, sites=3, studies_per_site=args.studies_per_site, seed=args.seed, small=not args.full_size
        )
    spec = load_task_spec(None)
    cohorts = load_site_cohorts({p.name: p for p in sorted(data.glob("site-*"))}, spec, workdir / "cache")
    budget = Budget(rounds=args.rounds, local_steps=args.local_steps, seed=args.seed)
    experiment = Experiment(spec, cohorts, budget)
    names = [n for n in EXPERIMENTS if args.name in (n, "all")]
    report = ReportWriter(workdir / "report")
    plt = report.plt
    summary: dict[str, Any] = {}
    for name in names:
        results = [
            experiment.run(arm, progress=lambda t: print(t, file=sys.stderr, flush=True)) for arm in EXPERIMENTS[name]
        ]
        rows = results_table(results)
        print(f"\n== {name} ({budget.rounds} rounds x {budget.local_steps} local steps, 3 sites) ==")
        print(" | ".join(TABLE_HEADER))
        for row in rows:
            print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
        report.table(name, TABLE_HEADER, rows)
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
        labels = [r.arm.name for r in results]
        for ax, key in zip(axes, ("dice", "auc"), strict=True):
            ax.barh(labels, [r.pooled.get(key) or 0.0 for r in results])
            ax.set(xlim=(0, 1), title=f"{key} on the pooled held-out test set")
        report.figure(f"{name}_bars", f"{name}: Dice and AUC", fig)
        curves = [r for r in results if r.per_round]
        if curves:
            fig, ax = plt.subplots(figsize=(6, 3.4))
            for r in curves:
                ax.plot(
                    [m["round"] for m in r.per_round],
                    [m.get("dice") or 0 for m in r.per_round],
                    marker="o",
                    label=r.arm.name,
                )
            ax.set(xlabel="round", ylabel="pooled Dice", ylim=(0, 1))
            ax.legend(fontsize=7)
            report.figure(f"{name}_rounds", f"{name}: Dice per round", fig)
        summary[name] = [
            {"arm": r.arm.name, **r.pooled, "seconds": r.seconds, "flagged": sorted(set(r.flagged))} for r in results
        ]
    (workdir / "results.json").write_text(json.dumps(summary, indent=1))
    page = report.write(
        f"radfed experiment: {args.name}",
        f"3 synthetic hospitals, {args.studies_per_site} studies each; "
        f"{budget.rounds} rounds x {budget.local_steps} steps; held-out test set from all sites.",
    )
    print(f"\nreport: {page}\nresults: {workdir / 'results.json'}")
    return 0


def add_parser(commands: Any) -> None:
    experiment = commands.add_parser("experiment", help="research questions side by side on the same data")
    experiment.add_argument("name", choices=NAMES)
    experiment.add_argument("--studies-per-site", type=int, default=12)
    experiment.add_argument("--rounds", type=int, default=5)
    experiment.add_argument("--local-steps", type=int, default=30)
    experiment.add_argument("--full-size", action="store_true")
    experiment.add_argument("--seed", type=int, default=0)
    experiment.add_argument("--workdir", type=Path, default=Path("radfed-experiments"))
    experiment.set_defaults(handler=cmd_experiment)
