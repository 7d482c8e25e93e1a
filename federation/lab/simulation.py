"""A large federation on Flower's simulation runtime (Ray): N simulated hospitals with non-IID synthetic
cohorts, driven by the deployment's own ServerApp and ClientApp (no second code path for training,
aggregation, DP or evaluation). Only the transport differs: no SuperLink, SuperNodes or site workers; Ray
actors run the ClientApp, and each simulated site keeps its state (optimiser, privacy accountant, reply
cache) in its own folder by site id (``federation/site/worker.py:simulated_node_config``)."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radfed.federation.coordinator.checkpoint import read_metrics
from radfed.federation.site.worker import simulated_site_name
from radfed.inference.testing.synthetic.sites import site_profile
from radfed.inference.testing.synthetic.writer import iter_site_studies, label_row, write_labels, write_study

SITES_FOLDER = "sites"
COORDINATOR_FOLDER = "coordinator"


@dataclass(frozen=True)
class CohortSizes:
    """Studies per simulated site: a long tail (Pareto, shape ``tail``) between ``smallest`` and ``largest``,
    as in real consortia where a few large centres sit beside many small ones."""

    smallest: int = 4
    largest: int = 40
    tail: float = 1.5

    def draw(self, sites: int, seed: int) -> list[int]:
        rng = random.Random(seed)
        return [min(self.largest, int(self.smallest * rng.paretovariate(self.tail))) for _ in range(sites)]


@dataclass(frozen=True)
class Simulation:
    """One job over ``sites`` simulated hospitals, ``sites_per_round`` of them asked each training round."""

    root: Path
    sites: int
    sites_per_round: int = 10
    rounds: int = 3
    local_steps: int = 5
    epsilon: float = 0.0  # each site's DP budget (0: none)
    seed: int = 0
    workers: int = 0  # Ray actors training at once (0: the cores of this machine), one CPU each
    run_config: Mapping[str, bool | int | float | str] = field(default_factory=dict)  # more run-config keys

    @property
    def out(self) -> Path:
        return self.root / COORDINATOR_FOLDER

    def job_config(self) -> dict[str, bool | int | float | str]:
        """The run config the ServerApp reads (keys it omits take RunConfig's defaults)."""
        per_round = min(self.sites_per_round, self.sites) if self.sites_per_round else 0
        return {
            "num-server-rounds": self.rounds,
            "local-steps": self.local_steps,
            "min-sites": min(2, per_round or self.sites),
            "sites-per-round": per_round,
            "epsilon": self.epsilon,
            "job": f"simulation-{self.sites}",
            "out-dir": str(self.out),
            "simulation-root": str(self.root),
            "seed": self.seed,
            "rollout": False,  # no model registries: the simulated sites are folders
            "membership-audit": "off",
            **self.run_config,
        }


def synthesize_sites(root: Path, sizes: Sequence[int], seed: int, *, jobs: int = 0) -> list[Path]:
    """Write simulated site ``i``'s studies under ``root/sites/site-<i>/`` (the scanner profiles of radfed's
    synthetic sites cycle, so vendors, field strengths and grids differ between sites); an existing site folder
    with its labels is kept (the data of N = 10 is the first 10 sites of N = 100)."""
    folders = [root / SITES_FOLDER / simulated_site_name(i) for i in range(len(sizes))]
    todo = [(i, n, folders[i]) for i, n in enumerate(sizes) if not (folders[i] / "labels.csv").is_file()]
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(_synthesize_site, *zip(*todo, strict=True), [seed] * len(todo)))
    else:
        for index, count, folder in todo:
            _synthesize_site(index, count, folder, seed)
    return folders


def _synthesize_site(index: int, count: int, folder: Path, seed: int) -> None:
    profile = site_profile(index + 1, small=True)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for study in iter_site_studies(profile, count, seed * 1000 + index):
        write_study(study, folder)
        rows.append(label_row(study))
    write_labels(rows, folder / "labels.csv")  # last: its presence marks the site complete


def run(simulation: Simulation) -> list[dict[str, Any]]:
    """Run the job on Flower's simulation runtime; returns the coordinator's metrics lines (one per round,
    then the final evaluation). Needs ``flwr[simulation]`` (Ray): ``pip install radfed[simulation]``."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from radfed.federation.coordinator import server_app
    from radfed.federation.site import client_app

    if simulation.sites < 2:
        raise ValueError("a simulated federation needs at least 2 sites")
    missing = [n for n in range(simulation.sites) if not (_site_folder(simulation.root, n) / "labels.csv").is_file()]
    if missing:
        raise FileNotFoundError(f"no data for simulated site(s) {missing[:5]} under {simulation.root / SITES_FOLDER}")
    config = simulation.job_config()
    coordinator = ServerApp()

    @coordinator.main()
    def _main(grid: Grid, context: Context) -> None:
        # the deployment's ServerApp, with the job's run config (the simulation API takes none of its own)
        job = Context(context.run_id, context.node_id, context.node_config, context.state, dict(config))
        server_app.main(grid, job)

    workers = simulation.workers or os.cpu_count() or 1
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=coordinator,
        client_app=client_app.app,
        num_supernodes=simulation.sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": workers, "include_dashboard": False},
        },
    )
    return read_metrics(simulation.out)


def _site_folder(root: Path, partition: int) -> Path:
    return root / SITES_FOLDER / simulated_site_name(partition)


@dataclass(frozen=True)
class RoundCost:
    """What one training round cost the coordinator and the network, from its metrics line."""

    round: int
    sites_asked: int
    aggregated: int
    seconds: float  # the round end to end (sites' training included)
    coordinator_cpu_seconds: float  # the ServerApp thread's own CPU time (packing, screening, aggregation)
    coordinator_peak_rss_mb: float  # the coordinator process so far (with the simulation driver)
    site_compute_seconds: float  # the slowest site's evaluation + training
    bytes_per_round: int  # the model down to every site asked plus every update up

    @classmethod
    def from_metrics(cls, line: Mapping[str, Any]) -> RoundCost:
        sites = line.get("sites", {})
        return cls(
            round=int(line["round"]),
            sites_asked=int(line.get("sites_asked", len(sites))),
            aggregated=len(line.get("aggregated", [])),
            seconds=float(line["seconds"]),
            coordinator_cpu_seconds=float(line.get("coordinator_cpu_seconds", 0.0)),
            coordinator_peak_rss_mb=float(line.get("coordinator_peak_rss_mb", 0.0)),
            site_compute_seconds=float(line.get("site_compute_seconds", 0.0)),
            bytes_per_round=sum(int(s.get("bytes_down", 0)) + int(s.get("bytes_up", 0)) for s in sites.values()),
        )


def round_costs(lines: Sequence[Mapping[str, Any]]) -> list[RoundCost]:
    return [RoundCost.from_metrics(line) for line in lines if "round" in line]


def final_evaluation(lines: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The final model's pooled evaluation over every site's held-out studies ({} when none)."""
    final = [line for line in lines if line.get("stage") == "final"]
    return dict(((final[-1].get("evaluation") or {}).get("pooled") or {}) if final else {})
