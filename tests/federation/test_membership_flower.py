"""The membership-inference audit on real Flower processes: two hospitals (each its own Orthanc), a SuperLink and
two SuperNodes, one round, then the final evaluation with ``membership-audit = lira``. Each site's attack
figures reach the coordinator's job metrics, the artifact's provenance and the model card, while what left each
site (recorded by the test ClientApp: record and metric names, never values) holds only allow-listed scalars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radfed.federation.coordinator.checkpoint import read_metrics
from radfed.federation.lab.loopback import FederationOptions, LoopbackFederation
from radfed.federation.learning.membership import METRICS
from radfed.federation.learning.messages import ALLOWED_METRICS, ALLOWED_VECTORS
from radfed.inference.model.artifact import load_artifact
from tests.federation.flower_apps import recording_app

pytestmark = [pytest.mark.orthanc, pytest.mark.flower]

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("hospital-1", "hospital-2")


def test_each_sites_audit_reaches_the_coordinator_and_the_card_and_no_score_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the SuperNodes import the recording ClientApp
    # seed 4: each hospital's 4 studies split 2 training / 2 held out at held-out-fraction 0.5 (by study hash)
    federation = LoopbackFederation(
        tmp_path / "fed", recording_app(tmp_path), FederationOptions(sites=2, studies_per_site=4, seed=4, secure=False)
    )
    federation.start()
    out = tmp_path / "job"
    config = {
        "num-server-rounds": 1,
        "local-steps": 2,
        "min-sites": 2,
        "epsilon": 8.0,
        "held-out-fraction": 0.5,
        "rollout": False,
        "membership-audit": "lira",
        "membership-references": 2,
        "membership-steps": 2,
        "job": "audit",
    }
    try:
        outcome = federation.run_job(out, config, timeout_s=900)
        assert outcome.ok, outcome.log[-3000:]
    finally:
        federation.stop()

    final = next(m for m in read_metrics(out) if m.get("stage") == "final")
    audit = final["membership_audit"]
    assert audit["attack"] == "lira" and set(audit["sites"]) == set(NAMES), audit
    for found in audit["sites"].values():
        assert found["members"] >= 1 and found["non_members"] >= 1 and found["references"] == 2
        for key in ("loss_auc", "loss_tpr_at_1pct_fpr", "lira_auc", "lira_tpr_at_1pct_fpr"):
            assert isinstance(found[key], float) and 0.0 <= found[key] <= 1.0, (key, found)
    assert "membership audit: hospital-1 loss AUC" in outcome.log

    assert load_artifact(out / "artifact").provenance["membership_audit"] == audit
    card = (out / "model-card.md").read_text()
    assert "## Membership-inference audit" in card and "DP-SGD at epsilon 8" in card
    for site, found in audit["sites"].items():
        row = f"| {site} | {found['members']} | {found['non_members']} | {found['loss_auc']:.3f} |"
        assert row in card, card

    # what left each site: the final evaluation's reply carries the audit's names, all allow-listed scalars
    for site in federation.sites:
        replies = [json.loads(x) for x in (site.state_dir / "sent.jsonl").read_text().splitlines()]
        for reply in replies:
            keys = reply["records"]["metrics"]["keys"]
            assert not {k for k in keys if k.startswith("membership_")} - ALLOWED_METRICS
            assert not {k for k in keys if k.startswith("membership_")} & set(ALLOWED_VECTORS)  # never a vector
        evaluated = [r for r in replies if r["type"] == "evaluate"]
        assert len(evaluated) == 1 and set(METRICS) <= set(evaluated[0]["records"]["metrics"]["keys"])
        assert set(evaluated[0]["records"]) == {"metrics", "site"}  # no arrays from the evaluation
        trained = [r for r in replies if r["type"] == "train"]
        assert trained and not any(
            k.startswith("membership_") for r in trained for k in r["records"]["metrics"]["keys"]
        )
