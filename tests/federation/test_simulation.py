"""Issue 19 item 4: a federation on Flower's simulation runtime (Ray) runs the deployment's ServerApp and ClientApp
over simulated sites, asks sites-per-round of them per round, and keeps each site's state (its privacy accountant
above all) in that site's own folder, whichever Ray actor served it."""

from __future__ import annotations

from pathlib import Path

import pytest

from radfed.federation.coordinator.server_app import RoundDriver
from radfed.federation.job.run_config import RunConfig, RunConfigError
from radfed.federation.lab.simulation import (
    CohortSizes,
)
from radfed.federation.site.config import SiteConfig
from radfed.federation.site.worker import simulated_node_config

SITES, PER_ROUND, ROUNDS = 5, 3, 2


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
