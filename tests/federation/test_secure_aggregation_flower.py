"""Secure aggregation on real Flower processes: three hospitals, TLS and SuperNode authentication, two rounds of
Flower's SecAgg+ with DP; in round 2 one hospital drops out after sharing its keys. The job completes; each round's
new global model is the plain FedAvg of the clear updates the remaining sites masked (recorded at the sites by the
test ClientApp, inside the mod); and nothing the ServerApp received (recorded by the test ServerApp) holds an update
in the clear: no reply carries an array, and each masked vector is uncorrelated with the update it hides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from radfed.federation.coordinator.checkpoint import read_metrics
from radfed.federation.job.run_config import RunConfig
from radfed.federation.lab.loopback import FederationOptions, LoopbackFederation
from radfed.inference.model.artifact import load_artifact
from tests.federation.flower_apps import plumbing_task

pytestmark = [pytest.mark.orthanc, pytest.mark.flower]

ROOT = Path(__file__).resolve().parents[2]
ROUNDS, SITES, CLIP = 2, 3, 10.0
DROPPED, DROP_ROUND = "hospital-3", 2  # below SecAgg+'s threshold of 2 of 3 the round could not be unmasked


def secure_app(tmp_path: Path) -> Path:
    app = tmp_path / "flower-app"
    shutil.copytree(ROOT / "deploy" / "flower", app)
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text()
    text = text.replace("radfed.federation.coordinator.server_app:app", "tests.federation.secure_apps:server")
    text = text.replace("radfed.federation.site.client_app:app", "tests.federation.secure_client_app:client")
    pyproject.write_text(text)
    return app


def clear(site_state: Path, server_round: int) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """A site's recorded (update, global model it received, weight) of one round."""
    with np.load(site_state / "clear" / f"round-{server_round}.npz") as saved:
        count = sum(1 for k in saved.files if k.startswith("update_"))
        return (
            [saved[f"update_{i}"] for i in range(count)],
            [saved[f"received_{i}"] for i in range(count)],
            float(saved["weight"]),
        )


def test_a_secure_aggregation_job_learns_the_fedavg_of_updates_it_never_sees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the ServerApp and SuperNodes import the recording apps
    federation = LoopbackFederation(
        tmp_path / "fed",
        secure_app(tmp_path),
        FederationOptions(sites=SITES, studies_per_site=4, seed=3),
        node_config_extra={DROPPED: f"drop-secure-round={DROP_ROUND}"},
    )
    assert federation.options.secure  # TLS + SuperNode authentication
    federation.start()
    out = tmp_path / "job"
    config = {
        "num-server-rounds": ROUNDS,
        "local-steps": 2,
        "min-sites": SITES - 1,
        "epsilon": 8.0,
        "secure-aggregation": True,
        "update-clip-norm": CLIP,
        "rollout": False,
        "membership-audit": "off",
        "job": "secure",
        "task": str(plumbing_task(tmp_path)),
    }
    try:
        outcome = federation.run_job(out, config, timeout_s=1800)
        assert outcome.ok, outcome.log[-3000:]
    finally:
        federation.stop()

    rounds = [m for m in read_metrics(out) if "round" in m]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    survivors = {r: [s for s in federation.sites if (s.name, r) != (DROPPED, DROP_ROUND)] for r in range(1, ROUNDS + 1)}
    assert all(sorted(r["aggregated"]) == sorted(s.name for s in survivors[r["round"]]) for r in rounds)
    assert all(r["flagged"] == [] for r in rounds), rounds
    assert not rounds[0]["errors"] and "drops out of the secure round" in str(rounds[DROP_ROUND - 1]["errors"])
    dropped = next(s for s in federation.sites if s.name == DROPPED)
    assert not (dropped.state_dir / "clear" / f"round-{DROP_ROUND}.npz").exists()  # it never sent an update

    # each round's new global model is the plain FedAvg of the clear updates (server learning rate applied)
    rate = RunConfig().server_learning_rate
    final = load_artifact(out / "artifact").weights_path
    assert final is not None
    with np.load(final) as saved:
        final_arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    for server_round in range(1, ROUNDS + 1):
        recorded = [clear(site.state_dir, server_round) for site in survivors[server_round]]
        start = recorded[0][1]
        assert all(all(np.array_equal(a, b) for a, b in zip(r[1], start, strict=True)) for r in recorded)
        weights = np.array([r[2] for r in recorded])
        mean = [
            sum(w * r[0][i] for w, r in zip(weights, recorded, strict=True)) / weights.sum() for i in range(len(start))
        ]
        assert max(float(np.abs(m).max()) for m in mean) > 1e-4  # the sites did move the model
        expected = [s + rate * m for s, m in zip(start, mean, strict=True)]
        after = clear(federation.sites[0].state_dir, server_round + 1)[1] if server_round < ROUNDS else final_arrays
        error = max(float(np.abs(a - e).max()) for a, e in zip(after, expected, strict=True))
        tolerance = 1e-4  # SecAgg+ quantises to 2 x clip / 2**22 per site
        assert error < tolerance, (server_round, error)
        one_site = [s + rate * recorded[0][0][i] for i, s in enumerate(start)]  # not what a sum gives
        # told apart from one site's update by several tolerances (the gap scales with the server step)
        assert max(float(np.abs(a - e).max()) for a, e in zip(after, one_site, strict=True)) > 5 * tolerance

    # what the ServerApp received: no array in the clear, and masked vectors unrelated to the updates they hide
    received = [json.loads(line) for line in (out / "received.jsonl").read_text().splitlines()]
    failed = [(r["type"], r["group"]) for r in received if "error" in r]
    assert received and failed == [("train", str(DROP_ROUND))], failed  # only the dropout's training step
    with_data = [(r["type"], n) for r in received for n, rec in r["records"].items() if rec.get("arrays")]
    assert not with_data, with_data
    masked = sorted((out / "masked").glob("*.npy"))
    assert len(masked) == ROUNDS * SITES - 1
    for server_round in range(1, ROUNDS + 1):
        sites = survivors[server_round]
        updates = [np.concatenate([u.ravel() for u in clear(s.state_dir, server_round)[0]]) for s in sites]
        for path in (out / "masked").glob(f"{server_round}-*.npy"):
            vector = np.load(path).astype(np.float64)
            assert vector.size >= updates[0].size
            for update in updates:
                corr = np.corrcoef(vector[: update.size], update.astype(np.float64))[0, 1]
                assert abs(corr) < 0.05, (path.name, corr)

    card = (out / "model-card.md").read_text()
    assert "## Secure aggregation" in card and f"L2 norm {CLIP:g}" in card
