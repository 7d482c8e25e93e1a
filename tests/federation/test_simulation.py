"""Issue 19 item 4: a federation on Flower's simulation runtime (Ray) runs the deployment's ServerApp and ClientApp
over simulated sites, asks sites-per-round of them per round, and keeps each site's state (its privacy accountant
above all) in that site's own folder, whichever Ray actor served it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from radfed.federation.coordinator.server_app import RoundDriver
from radfed.federation.job.run_config import RunConfig, RunConfigError
from radfed.federation.lab.simulation import (
    CohortSizes,
    Simulation,
    final_evaluation,
    round_costs,
    run,
    synthesize_sites,
)
from radfed.federation.site.config import SiteConfig
from radfed.federation.site.worker import simulated_node_config
from tests.federation.flower_apps import plumbing_task

SITES, PER_ROUND, ROUNDS, STEPS = 5, 3, 2, 2


def test_cohort_sizes_are_long_tailed_within_bounds() -> None:
    sizes = CohortSizes(smallest=4, largest=40).draw(200, seed=1)
    assert min(sizes) == 4 and max(sizes) <= 40
    assert sorted(sizes)[100] < sum(sizes) / len(sizes)  # median below mean: a few large sites, many small
    assert sizes == CohortSizes(smallest=4, largest=40).draw(200, seed=1)


def test_sites_per_round_draws_from_the_job_seed_and_prefers_sites_not_asked(tmp_path: Path) -> None:
    run = RunConfig(sites_per_round=3, out_dir=str(tmp_path), job="j", seed=4)
    driver = RoundDriver(grid=None, run=run)  # type: ignore[arg-type]  # _sample never touches the grid
    nodes = list(range(10, 20))
    first = driver._sample(nodes, 3, "1:0")
    assert len(first) == 3 and set(first) <= set(nodes)
    assert first == RoundDriver(None, run)._sample(nodes, 3, "1:0")  # type: ignore[arg-type]
    assert any(driver._sample(nodes, 3, f"{r}:0") != first for r in range(2, 8))
    driver.asked = set(first)
    retry = driver._sample([n for n in nodes if n not in first[:1]], 2, "1:1")
    assert not set(retry) & set(first)  # a retry below quorum asks sites not asked yet
    with pytest.raises(RunConfigError, match="sites-per-round"):
        RunConfig(sites_per_round=1, min_sites=2)


def test_a_simulated_site_needs_the_simulation_root() -> None:
    with pytest.raises(ValueError, match="simulation-root"):
        simulated_node_config({"partition-id": 0, "num-partitions": 2}, {})
    config = simulated_node_config({"partition-id": 11}, {"simulation-root": "/sim"})
    site = SiteConfig.from_node_config(config)
    assert site.name == "site-012" and site.data == ("/sim/sites/site-012",)
    assert site.state_dir == Path("/sim/state/site-012")


@pytest.mark.flower
def test_a_simulated_federation_runs_the_deployment_apps_with_per_site_state(tmp_path: Path) -> None:
    """5 simulated sites on Ray, 3 asked per round, DP epsilon 8: each round asks 3 sites drawn from the job
    seed, each site keeps its own accountant under its own state folder, and the final model is evaluated on
    every site's held-out studies."""
    pytest.importorskip("ray", reason="flwr[simulation] (Ray) is part of the dev extra")
    sizes = [4, 5, 4, 4, 5]
    synthesize_sites(tmp_path, sizes, seed=2)
    simulation = Simulation(
        tmp_path,
        SITES,
        PER_ROUND,
        rounds=ROUNDS,
        local_steps=STEPS,
        epsilon=8.0,
        workers=2,
        # the default task, narrowed (2-D: its evaluation is quick; the 3-D bpmri task's took 100-260 s a site);
        # a generous timeout: 2 Ray actors serve 3 sites in turn, the first message on an actor imports torch
        run_config={"harmonise": False, "round-timeout": 1200.0, "task": str(plumbing_task(tmp_path / "task"))},
    )
    lines = run(simulation)
    costs = round_costs(lines)
    assert [c.round for c in costs] == list(range(1, ROUNDS + 1))
    rounds_trained: Counter[str] = Counter()
    for cost, line in zip(costs, [m for m in lines if "round" in m], strict=True):
        assert cost.sites_asked == PER_ROUND and cost.aggregated == PER_ROUND, line.get("errors")
        assert cost.coordinator_cpu_seconds > 0 and cost.bytes_per_round > 0
        rounds_trained.update(line["aggregated"])
    assert set(rounds_trained) <= {f"site-{i:03d}" for i in range(1, SITES + 1)}
    # per-site state: each site's accountant, in its own folder, counts the DP steps of the rounds it trained
    # in, whichever Ray actor served it (a shared or lost accountant would count other sites' steps or none)
    for accountant in (tmp_path / "state").glob("site-*/jobs/*/accountant.json"):
        steps = sum(entry[2] for entry in json.loads(accountant.read_text())["history"])
        assert steps == STEPS * rounds_trained.pop(accountant.parents[2].name), accountant
    assert not rounds_trained  # every site that trained has its accountant
    final = final_evaluation(lines)
    # the held-out studies of all 5 sites, not only of those asked in the last round; a site holding out one study
    # sends no figures (evaluation-min-studies) but is named
    evaluation = [m for m in lines if m.get("stage") == "final"][-1]["evaluation"]
    held_out, withheld = evaluation["sites"], evaluation["withheld"]
    assert held_out and not set(held_out) & set(withheld)
    assert set(held_out) | set(withheld) == {f"site-{i:03d}" for i in range(1, SITES + 1)}
    assert final.get("studies") == sum(s["studies"] for s in held_out.values()) > 0
