"""A real Flower deployment on loopback: SuperLink + two SuperNodes (one per hospital, each with its own
synthetic non-IID data), the radfed app from deploy/flower, two rounds of DP-SGD; the job ends with a
valid artifact and a metrics line per round holding only allow-listed numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from radfed.federation.messages import ALLOWED_METRICS, MetricLeakError, allowed_metrics
from radfed.inference.artifact import load_artifact
from radfed.inference.orthanc.launcher import free_port
from radfed.inference.synthetic.writer import synthesize_to_folder

APP = Path(__file__).resolve().parents[2] / "deploy" / "flower"
BIN = Path(sys.executable).parent


@pytest.fixture
def flower_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    return dict(
        os.environ,
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        ORT_DISABLE_TELEMETRY="1",
    )


def _wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


@pytest.fixture
def federation(tmp_path: Path, flower_env: dict[str, str]) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    control = free_port()
    data = tmp_path / "data"
    synthesize_to_folder(data, sites=2, studies_per_site=3, seed=6, small=True)
    processes: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def spawn(name: str, args: list[str]) -> None:
        with (logs / f"{name}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(args, env=flower_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    # Flower 1.41: the SuperLink's Fleet, Control and Runtime APIs share one HTTP port.
    spawn("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(control),
                        "--disable-runtime-dependency-installation"])  # fmt: skip
    _wait_for_port(control)
    for site in (1, 2):
        config = f"data='{data / f'site-{site}'}' state-dir='{tmp_path / f'state-{site}'}' site-name='site-{site}'"
        spawn(f"supernode-{site}", [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{control}",
                                    "--host", "127.0.0.1", "--port", str(free_port()),
                                    "--node-config", config])  # fmt: skip
    (Path(flower_env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{control}"\ninsecure = true\n'
    )
    try:
        yield control, processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def test_two_sites_two_rounds_with_dp(
    tmp_path: Path, flower_env: dict[str, str], federation: tuple[int, list[subprocess.Popen[bytes]]]
) -> None:
    out = tmp_path / "job"
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "test", "--stream", "--run-config",
         f"out-dir='{out}' num-server-rounds=2 local-steps=2 epsilon=6.0 min-sites=2 job='test-job'"],
        env=flower_env, capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
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
