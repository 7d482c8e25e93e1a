"""A coordinator that crashes in the middle of a job and comes back: the SuperLink (and the ServerApp under
it) is killed with SIGKILL after round 1, restarted on the same port and database, the job is submitted
again, and it resumes from the round-1 checkpoint instead of starting over. Two hospitals, DP-SGD, no TLS
(the secure path is test_federation_local's)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from radfed.federation.coordinator.checkpoint import CoordinatorCheckpoint, read_metrics
from radfed.federation.lab.loopback import FederationOptions, LoopbackFederation
from radfed.federation.learning.messages import MetricLeakError, allowed_metrics
from radfed.inference.model.artifact import load_artifact
from tests.federation.flower_apps import plumbing_task

pytestmark = [pytest.mark.orthanc, pytest.mark.flower]

APP = Path(__file__).resolve().parents[2] / "deploy" / "flower"


def test_coordinator_restart_resumes_from_checkpoint(tmp_path: Path) -> None:
    federation = LoopbackFederation(
        tmp_path / "fed", APP, FederationOptions(sites=2, studies_per_site=3, seed=6, secure=False)
    )
    federation.start()
    out = tmp_path / "job"
    config = {
        "num-server-rounds": 3,
        "local-steps": 2,
        "min-sites": 2,
        "epsilon": 6.0,
        "job": "restart",
        "task": str(plumbing_task(tmp_path)),
    }
    try:
        first = federation.submit(out, config)
        deadline = time.monotonic() + 400
        while not any(m.get("round") == 1 for m in read_metrics(out)):
            assert time.monotonic() < deadline, (out / "run.log").read_text()[-2000:]
            assert first.poll() is None, (out / "run.log").read_text()[-2000:]
            time.sleep(0.5)
        federation.restart_superlink(signal.SIGKILL)
        first.wait(timeout=60)
        assert not (out / "artifact").exists()
        federation.wait_online(2, timeout_s=120)
        outcome = federation.run_job(out, config, timeout_s=600)
        assert outcome.ok, outcome.log[-3000:]
    finally:
        federation.stop()
    assert "resuming after round 1" in outcome.log
    rounds = [m["round"] for m in read_metrics(out) if "round" in m]
    assert rounds == [1, 2, 3]  # round 1 was not trained again
    epsilons = [m["sites"]["hospital-1"]["epsilon"] for m in read_metrics(out) if "round" in m]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 6.0  # the sites' accountants survived too
    artifact = load_artifact(out / "artifact")
    assert artifact.provenance["rounds"] == 3 and artifact.provenance["training"] == "federated"
    assert artifact.provenance["local_steps"] == config["local-steps"]
    card = (out / "model-card.md").read_text()
    steps = 3 * int(config["local-steps"])
    assert f"3 rounds x {config['local-steps']} local steps ({steps} training steps at each site" in card, card
    # the share-of-largest rule the spec leaves open comes from the sites' summed reference-mask statistics
    state = CoordinatorCheckpoint.load(out)
    assert state is not None and set(state.lesion_kept_per_site) == {"hospital-1", "hospital-2"}
    # (the sites' final evaluation ran under it; the calibration on their held-out studies may then choose another)
    calibration = next(m for m in read_metrics(out) if m.get("stage") == "calibration")
    assert calibration["before"]["min_lesion_fraction"] == state.lesion_fraction()
    # hospital-1 holds out one study at this seed: under calibration-min-studies (2) it sends no sums
    assert calibration["withheld_sites"] == ["hospital-1"] and calibration["validation_studies"] == 2, calibration
    assert "hospital-1 held out fewer than calibration-min-studies (2)" in outcome.log
    # nor, under evaluation-min-studies (2), its evaluation figures: in no round and not at the end
    final = next(m for m in read_metrics(out) if m.get("stage") == "final")["evaluation"]
    assert final["withheld"] == ["hospital-1"] and set(final["sites"]) == {"hospital-2"}, final
    assert "hospital-1 held out fewer than evaluation-min-studies (2)" in outcome.log
    for line in (m for m in read_metrics(out) if "round" in m and "hospital-1" in m["sites"]):
        sent = line["sites"]["hospital-1"]
        assert sent.get("evaluation_withheld") == 1 and not any(k.startswith("eval_") for k in sent), sent
    assert artifact.spec.outputs.min_lesion_fraction == calibration["min_lesion_fraction"]
    # and the minimum slice extent from their summed reference lesion volumes
    assert set(state.lesion_extent_per_site) == {"hospital-1", "hospital-2"}
    assert artifact.spec.outputs.min_lesion_slices == state.lesion_slices()


def test_metric_allow_list() -> None:
    assert allowed_metrics({"dice": 0.5, "num-examples": 3}) == {"dice": 0.5, "num-examples": 3}
    assert allowed_metrics({"landmarks.t2w": [float(i) for i in range(11)]})
    with pytest.raises(MetricLeakError, match="allow-list"):
        allowed_metrics({"patient_id": 1})
    with pytest.raises(MetricLeakError, match="finite number"):
        allowed_metrics({"dice": float("nan")})
    with pytest.raises(MetricLeakError, match="aggregate vector"):
        allowed_metrics({"eval_scores_positive": [0.3]})  # a per-study score list is not a 64-bin histogram
    with pytest.raises(MetricLeakError, match="aggregate vector"):
        allowed_metrics({"pixels": [1, 2, 3]})
    # a site's share-of-largest statistics: one sum per share in calibration.FRACTIONS, nothing per study
    assert allowed_metrics({"lesion_kept": [3.0, 2.9, 2.8, 2.5, 2.0], "lesion_kept_studies": 3})
    with pytest.raises(MetricLeakError, match="aggregate vector"):
        allowed_metrics({"lesion_kept": [0.9] * 40})
