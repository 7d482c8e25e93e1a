"""A real Flower deployment on loopback: SuperLink + two SuperNodes (one per hospital, each with its own
synthetic non-IID data), the radfed app from deploy/flower, two rounds of DP-SGD; the job ends with a
valid artifact and a metrics line per round holding only allow-listed numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from radfed.federation.messages import ALLOWED_METRICS, MetricLeakError, allowed_metrics
from radfed.inference.artifact import load_artifact
from radfed.inference.orthanc.launcher import free_port
from radfed.inference.synthetic.writer import synthesize_to_folder
from tests.federation.flower_harness import BIN, ProcessGroup, wait_for_port
from tests.federation.flower_harness import flower_env as harness_env

APP = Path(__file__).resolve().parents[2] / "deploy" / "flower"


@pytest.fixture
def flower_env(tmp_path: Path) -> dict[str, str]:
    return harness_env(tmp_path / "flwr-home")


@pytest.fixture
def federation(tmp_path: Path, flower_env: dict[str, str]) -> Iterator[int]:
    """An insecure SuperLink and two SuperNodes with their own synthetic sites; yields the SuperLink port."""
    control = free_port()
    data = tmp_path / "data"
    synthesize_to_folder(data, sites=2, studies_per_site=3, seed=6, small=True)
    group = ProcessGroup(tmp_path / "logs", flower_env)
    try:
        # Flower 1.41: the SuperLink's Fleet, Control and Runtime APIs share one HTTP port.
        group.spawn(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(control),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(control)
        for site in (1, 2):
            config = f"data='{data / f'site-{site}'}' state-dir='{tmp_path / f'state-{site}'}' site-name='site-{site}'"
            group.spawn(
                f"supernode-{site}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{control}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    config,
                ],
            )
        (Path(flower_env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{control}"\ninsecure = true\n'
        )
        yield control
    finally:
        group.stop()


def test_two_sites_two_rounds_with_dp(tmp_path: Path, flower_env: dict[str, str], federation: int) -> None:
    out = tmp_path / "job"
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    run = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            str(app),
            "test",
            "--stream",
            "--run-config",
            f"out-dir='{out}' num-server-rounds=2 local-steps=2 epsilon=6.0 min-sites=2 job='test-job'",
        ],
        env=flower_env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert len(line["sites"]) == 2
        assert len(line["aggregated"]) == 2 and line["flagged"] == []
        for metrics in line["sites"].values():
            assert set(metrics) <= ALLOWED_METRICS  # nothing else left the sites
            assert metrics["studies_usable"] == 3
    epsilons = [m["epsilon"] for m in lines[-1]["sites"].values()]
    assert all(0 < e <= 6.0 for e in epsilons)
    assert all(lines[0]["sites"][k]["epsilon"] < lines[1]["sites"][k]["epsilon"] for k in lines[0]["sites"])
    artifact = load_artifact(out / "artifact")
    assert artifact.provenance["training"] == "federated"
    assert artifact.provenance["rounds"] == 2
    assert sorted(artifact.provenance["studies_per_site"].values()) == [3, 3]
    assert artifact.provenance["differential_privacy"]["epsilon_budget"] == 6.0


def test_metric_allow_list() -> None:
    assert allowed_metrics({"dice": 0.5, "num-examples": 3}) == {"dice": 0.5, "num-examples": 3}
    with pytest.raises(MetricLeakError, match="allow-list"):
        allowed_metrics({"patient_id": 1})
    with pytest.raises(MetricLeakError, match="finite number"):
        allowed_metrics({"dice": float("nan")})
