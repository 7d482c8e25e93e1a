"""The federation as hospitals run it, on loopback: four real Orthanc instances with different synthetic
(non-IID) studies, a SuperLink with TLS and SuperNode authentication, four SuperNodes, DP-SGD, federated
harmonisation, three rounds with evaluation, ONNX artifact, model card and rollout into each site's
registry, where a real ``radfed serve`` activates it. Faults injected on purpose: a node with an
unregistered key, a hospital that sends scaled (x20) updates, and a hospital killed in the middle of a round.
(Sign-flipped updates are caught in test_aggregation; under this test's DP noise, 3-study cohorts send
updates that are nearly orthogonal, so a flip is not distinguishable there: see aggregation.py.)"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import signal
import time
from pathlib import Path

import pytest

from radfed.federation.coordinator import read_metrics
from radfed.federation.launcher import FederationOptions, LocalFederation
from radfed.federation.messages import ALLOWED_METRICS, ALLOWED_VECTORS, FINGERPRINT_PREFIX, LANDMARK_PREFIX
from radfed.federation.training import new_model
from radfed.inference.artifact import load_artifact
from tests.plugin.node_harness import NodeProcess

ROOT = Path(__file__).resolve().parents[2]


def poisoning_app(tmp_path: Path) -> Path:
    app = tmp_path / "flower-app"
    shutil.copytree(ROOT / "deploy" / "flower", app)
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            'clientapp = "radfed.federation.client_app:app"', 'clientapp = "tests.federation.poisoned_client_app:app"'
        )
    )
    return app


def wait_for_round(out: Path, number: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(m.get("round") == number for m in read_metrics(out)):
            return
        time.sleep(1)
    raise AssertionError(f"round {number} did not finish in {timeout_s:.0f} s")


def test_four_hospitals_secure_dp_poisoned_and_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the SuperNodes import the fault-injecting ClientApp
    federation = LocalFederation(
        tmp_path / "fed",
        poisoning_app(tmp_path),
        FederationOptions(sites=4, studies_per_site=4, seed=3, small=True, secure=True),
        node_config_extra={"hospital-4": "poison='scale'"},
    )
    federation.start()
    try:
        intruder = federation.start_unregistered()
        out = tmp_path / "job"
        job = federation.submit(
            out,
            {
                "num-server-rounds": 3,
                "local-steps": 3,
                "min-sites": 2,
                "epsilon": 8.0,
                "aggregation": "fedavg",
                "harmonise": True,
                "rollout": True,
                "round-timeout": 90,
                "job": "resilience",
            },
        )
        wait_for_round(out, 1, 400)
        killed = federation.sites[2]
        assert killed.supernode is not None
        killed.supernode.stop(signal.SIGKILL)  # hospital-3 dies while round 2 is under way
        assert job.wait(timeout=600) == 0, (out / "run.log").read_text()[-3000:]
        assert (out / "artifact" / "manifest.json").is_file(), (out / "run.log").read_text()[-3000:]
        assert federation.online_nodes() == 3  # the intruder never joined; hospital-3 is gone
        assert intruder.alive() or intruder.tail(50)  # it kept knocking (or gave up), never counted online
    finally:
        federation.stop()

    lines = read_metrics(out)
    harmonisation = next(m for m in lines if m.get("stage") == "harmonisation")
    assert set(harmonisation["site_landmarks"]) == {f"hospital-{i}" for i in range(1, 5)}
    reference = harmonisation["reference"]
    assert set(reference) == {"t2w", "adc", "dwi"}
    assert all(all(b > a for a, b in itertools.pairwise(v)) for v in reference.values())
    # different scanners: the sites' T2W landmarks differ, and the reference lies between them
    t2w_medians = [site["t2w"][5] for site in harmonisation["site_landmarks"].values()]
    assert min(t2w_medians) < reference["t2w"][5] < max(t2w_medians)

    rounds = [m for m in lines if "round" in m]
    assert [m["round"] for m in rounds] == [1, 2, 3]
    for line in rounds:
        assert {f["site"] for f in line["flagged"]} == {"hospital-4"}, line["flagged"]  # named, every round
        assert "hospital-4" not in line["aggregated"]
        for metrics in line["sites"].values():
            assert set(metrics) - {"bytes_down", "bytes_up"} <= ALLOWED_METRICS
            assert 0 < metrics["epsilon"] <= 8.0
        assert line["evaluation"]["pooled"]["studies"] >= 1
        assert line["overhead_seconds"] >= 0 and line["site_compute_seconds"] > 0
    assert "hospital-3" in rounds[0]["sites"]
    for line in rounds[1:]:
        assert "hospital-3" not in line["sites"]  # killed: the job went on without it
    # the coordinator names what happened: no reply, or the SuperLink's "Node Unavailable" (missed heartbeats)
    assert any("no reply" in e or "Unavailable" in e for e in rounds[1]["errors"].values()), rounds[1]["errors"]
    epsilon = [rounds[i]["sites"]["hospital-1"]["epsilon"] for i in range(3)]
    assert epsilon == sorted(epsilon) and epsilon[0] < epsilon[-1]  # the accountant adds up across rounds
    final = next(m for m in lines if m.get("stage") == "final")
    assert set(final["evaluation"]["sites"]) >= {"hospital-1", "hospital-2"}
    for key in ("dice", "lesion_sensitivity", "auc", "sensitivity", "specificity", "f1"):
        assert key in final["evaluation"]["pooled"]

    artifact = load_artifact(out / "artifact")
    assert artifact.harmonisation == reference
    assert artifact.provenance["differential_privacy"]["epsilon_budget"] == 8.0
    card = (out / "model-card.md").read_text()
    assert "hospital-1" in card and "pooled" in card
    rollout = next(m for m in lines if m.get("stage") == "rollout")
    assert {"hospital-1", "hospital-2", "hospital-4"} <= set(rollout["installed"])

    # every reply any site sent: only allow-listed metrics, the site's name, and arrays shaped like the model
    job_spec = load_artifact(out / "artifact").spec  # planned by the coordinator from the sites' fingerprints
    model_shapes = [list(t.shape) for t in new_model(job_spec).state_dict().values()]
    replies = [
        json.loads(x) for site in federation.sites for x in (site.state_dir / "sent.jsonl").read_text().splitlines()
    ]
    assert {r["type"] for r in replies} == {
        "train",
        "evaluate",
        "query.fingerprint",
        "query.landmarks",
        "query.rollout",
    }
    for reply in replies:
        recs = reply["records"]
        assert set(recs) <= {"metrics", "site", "arrays"}, recs
        assert recs["site"] == {"kind": "config", "keys": ["name"]}
        for key in recs["metrics"]["keys"]:
            assert (
                key in ALLOWED_METRICS
                or key in ALLOWED_VECTORS
                or key.startswith((LANDMARK_PREFIX, FINGERPRINT_PREFIX))
            ), key
        if "arrays" in recs:
            assert reply["type"] == "train" and recs["arrays"]["shapes"] == model_shapes
            # on the wire: one float32 vector of exactly the model's values, and the shapes header
            size = sum(math.prod(shape) for shape in model_shapes)
            header = 1 + sum(1 + len(shape) for shape in model_shapes)
            assert recs["arrays"]["wire"] == {"model": ["float32", [size]], "shapes": ["int64", [header]]}

    # hospital-1's node activates the rolled-out model from its registry
    site = federation.sites[0]
    site.orthanc.restart()
    node = NodeProcess(tmp_path / "node", site.orthanc, None)
    node.env["RADFED_MODELS_DIR"] = str(site.models_dir)
    node.start()
    try:
        assert node.get("/models") == [{"name": artifact.identity.name, "version": "1.0.0", "active": False}]
        node.post(f"/models/{artifact.identity.name}/1.0.0/activate")
        active = node.get("/models/active")
        assert active["sha256"] == artifact.sha256
        assert active["provenance"]["training"] == "federated"
    finally:
        node.stop()
        site.orthanc.stop()
