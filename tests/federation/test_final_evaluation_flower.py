"""The final evaluation's bias checks and membership-inference audit on real Flower processes, in one job (one
federation start for both): two hospitals with two scanner vendors each (each its own Orthanc: the launcher's
synthetic site, plus the studies of another synthetic site with another vendor and field strength), one round at
DP epsilon 8, then the final evaluation with ``bias-min-cell = 2`` and ``membership-audit = lira``.

- Bias checks: the pooled subgroup table reaches the job's metrics, the artifact's provenance and the model card;
  what left each site (recorded by the test ClientApp: metric names, never values) holds no subgroup that had
  fewer than ``bias-min-cell`` held-out studies there, by the synthetic truth.
- Calibration: the artifact's threshold, minimum size and study temperature are chosen from both sites' sums over
  their held-out studies, recorded in the job's metrics, the provenance and the model card.
- Audit: each site's attack figures reach the coordinator's job metrics, the artifact's provenance and the model
  card, and what left each site holds only allow-listed scalars, in the final evaluation's reply only."""

from __future__ import annotations

import csv
import json
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from radfed.federation.coordinator.checkpoint import read_metrics
from radfed.federation.lab.loopback import FederationOptions, LoopbackFederation
from radfed.federation.learning.cohort import is_held_out, study_key
from radfed.federation.learning.membership import METRICS
from radfed.federation.learning.messages import ALLOWED_METRICS, ALLOWED_VECTORS
from radfed.inference.model.artifact import load_artifact
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.synthetic.sites import site_profile
from radfed.inference.testing.synthetic.study import SyntheticStudy
from radfed.inference.testing.synthetic.writer import iter_site_studies, label_row, upload_study, write_labels
from tests.federation.flower_apps import plumbing_task, recording_app

pytestmark = [pytest.mark.orthanc, pytest.mark.flower]

ROOT = Path(__file__).resolve().parents[2]
STUDIES, SEED, MIN_CELL, HELD_OUT = 4, 5, 2, 0.5
# hospital-1: site 1 (Siemens 3 T) + site 6 (Philips 1.5 T); hospital-2: site 2 (GE 1.5 T) + site 3 (Philips 3 T).
# At seed 5, 4 studies each: hospital-1 holds out 3 + 3, ages 50s 1, 60s 2, 70s 3; hospital-2 3 + 2, 50s 3, 60s 1,
# 70s 1: cells of one study at both.
PROFILES = {"hospital-1": (1, 6), "hospital-2": (2, 3)}
VENDORS = {"SIEMENS": "siemens", "GE MEDICAL SYSTEMS": "ge", "Philips Medical Systems": "philips"}


def truth(study: SyntheticStudy, index: int) -> dict[str, str]:
    """A study's subgroups as the generator made them (not read back from DICOM)."""
    profile = site_profile(index, small=True)
    born = datetime.strptime(study.identity.patient_birth_date, "%Y%m%d")
    seen = datetime.strptime(study.identity.study_date, "%Y%m%d")
    decade = int((seen - born).days / 365.25) // 10 * 10
    return {
        "vendor": VENDORS[profile.vendor.manufacturer],
        "field-strength": "3T" if profile.field_strength_t == 3.0 else "1.5T",
        "age": f"{decade}-{decade + 9}",
        "sex": "M",
    }


def held_out_cells(indices: tuple[int, ...]) -> Counter[str]:
    """Held-out studies per subgroup cell name at one hospital (the synthetic truth)."""
    cells: Counter[str] = Counter()
    for index in indices:
        for study in iter_site_studies(site_profile(index, small=True), STUDIES, SEED):
            if is_held_out(study_key(study.identity.study_instance_uid), HELD_OUT):
                cells.update(f"subgroup.{a}.{v}" for a, v in truth(study, index).items())
    return cells


def held_out_studies(indices: tuple[int, ...]) -> int:
    return sum(
        is_held_out(study_key(study.identity.study_instance_uid), HELD_OUT)
        for index in indices
        for study in iter_site_studies(site_profile(index, small=True), STUDIES, SEED)
    )


def add_second_vendor(federation: LoopbackFederation) -> None:
    for site in federation.sites:
        index = PROFILES[site.name][1]
        with site.labels.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        with OrthancClient(site.orthanc.endpoint) as client:
            for study in iter_site_studies(site_profile(index, small=True), STUDIES, SEED):
                upload_study(study, client)
                rows.append(label_row(study))
        write_labels(rows, site.labels)


def test_subgroups_and_membership_audit_are_pooled_and_nothing_else_leaves_a_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the SuperNodes import the recording ClientApp
    expected = {name: held_out_cells(indices) for name, indices in PROFILES.items()}
    small = {name: {c for c, n in cells.items() if n < MIN_CELL} for name, cells in expected.items()}
    assert all(small.values()), expected  # the check below is not vacuous: each site has a cell of one study
    federation = LoopbackFederation(
        tmp_path / "fed",
        recording_app(tmp_path),
        FederationOptions(sites=2, studies_per_site=STUDIES, seed=SEED, secure=False),
    )
    federation.start()
    out = tmp_path / "job"
    config = {
        "num-server-rounds": 1,
        "local-steps": 2,
        "min-sites": 2,
        "epsilon": 8.0,
        "held-out-fraction": HELD_OUT,
        "rollout": False,
        "membership-audit": "lira",
        "membership-references": 2,
        "membership-steps": 2,
        "bias-min-cell": MIN_CELL,
        "job": "final-evaluation",
        "task": str(plumbing_task(tmp_path)),
    }
    try:
        add_second_vendor(federation)
        outcome = federation.run_job(out, config, timeout_s=1800)
        assert outcome.ok, outcome.log[-3000:]
    finally:
        federation.stop()

    final = next(m for m in read_metrics(out) if m.get("stage") == "final")
    table = final["evaluation"]["subgroups"]
    assert table["min_cell"] == MIN_CELL and set(table["sites"]) == set(PROFILES)
    vendors = table["attributes"]["vendor"]["cells"]
    assert set(vendors) == {"siemens", "philips", "ge"}, table  # two vendors at each hospital, both >= k
    assert (
        vendors["philips"]["studies"]
        == expected["hospital-1"]["subgroup.vendor.philips"] + (expected["hospital-2"]["subgroup.vendor.philips"])
    )
    for site, cells in table["sites"].items():
        for name, summary in cells.items():
            assert summary["studies"] == expected[site][f"subgroup.{name}"] >= MIN_CELL, (site, name, summary)
    assert load_artifact(out / "artifact").provenance["validation"]["subgroups"] == table
    card = (out / "model-card.md").read_text()
    assert "## Bias checks" in card and f"| vendor | philips | {vendors['philips']['studies']} |" in card, card

    # the membership audit: each site's figures in the final metrics, the provenance and the card
    audit = final["membership_audit"]
    assert audit["attack"] == "lira" and set(audit["sites"]) == set(PROFILES), audit
    for found in audit["sites"].values():
        assert found["members"] >= 1 and found["non_members"] >= 1 and found["references"] == 2
        for key in ("loss_auc", "loss_tpr_at_1pct_fpr", "lira_auc", "lira_tpr_at_1pct_fpr"):
            assert isinstance(found[key], float) and 0.0 <= found[key] <= 1.0, (key, found)
    assert "membership audit: hospital-1 loss AUC" in outcome.log
    assert load_artifact(out / "artifact").provenance["membership_audit"] == audit
    assert "## Membership-inference audit" in card and "DP-SGD at epsilon 8" in card
    for site, found in audit["sites"].items():
        assert f"| {site} | {found['members']} | {found['non_members']} | {found['loss_auc']:.3f} |" in card, card

    # output calibration: chosen from both sites' held-out sums, in the job's metrics, the manifest and the card
    held_out = sum(held_out_studies(indices) for indices in PROFILES.values())
    calibration = next(m for m in read_metrics(out) if m.get("stage") == "calibration")
    assert calibration["validation_studies"] == held_out, calibration
    artifact = load_artifact(out / "artifact")
    assert artifact.provenance["calibration"] == {k: v for k, v in calibration.items() if k != "stage"}
    outputs = artifact.spec.outputs
    chosen = (outputs.lesion_threshold, outputs.min_lesion_volume_mm3, outputs.study_temperature)
    assert chosen == (
        calibration["lesion_threshold"],
        calibration["min_lesion_volume_mm3"],
        calibration["study_temperature"],
    )
    assert "## Output calibration" in card and f"{held_out} held-out studies" in card, card

    # what left each site: subgroup cells only in the final evaluation, none with fewer than k held-out studies;
    # the audit's figures likewise, all allow-listed scalars
    for site in federation.sites:
        replies = [json.loads(x) for x in (site.state_dir / "sent.jsonl").read_text().splitlines()]
        evaluated = [r for r in replies if r["type"] == "evaluate"]
        assert len(evaluated) == 1
        sent = {k for k in evaluated[0]["records"]["metrics"]["keys"] if k.startswith("subgroup.")}
        assert sent and all(expected[site.name][name] >= MIN_CELL for name in sent), (site.name, sent)
        assert not sent & small[site.name]
        assert "subgroup_suppressed" in evaluated[0]["records"]["metrics"]["keys"]
        before = [r["records"].get("metrics", {}).get("keys", []) for r in replies if r["type"] != "evaluate"]
        assert not [k for keys in before for k in keys if k.startswith(("subgroup", "membership_", "calibration_"))]
        keys = evaluated[0]["records"]["metrics"]["keys"]
        assert {"calibration_dice", "calibration_gain_sq", "calibration_studies", "calibration_nll"} <= set(keys)
        assert set(METRICS) <= set(keys)
        assert not {k for k in keys if k.startswith("membership_")} - ALLOWED_METRICS
        assert not {k for k in keys if k.startswith("membership_")} & set(ALLOWED_VECTORS)  # never a vector
        assert set(evaluated[0]["records"]) == {"metrics", "site"}  # no arrays from the evaluation
        assert any(r["type"] == "train" for r in replies)
