"""A site's membership-inference audit at the end of a job (``site.rounds.evaluate_round``, the job's last message):
its metrics pass the allow-list, hold each attack's AUC and TPR at 1 % FPR and the two study counts, and nothing
per study; ``off`` sends none of them. The per-study loss ranks a right prediction below a wrong one. In a job that
fine-tunes a base model, LiRA's reference models start from the job's starting model (kept by the site in round 1).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from radfed.federation.learning.cohort import TrainingSample, cohort_from_sources
from radfed.federation.learning.membership import METRICS, MembershipAudit, logit_confidence
from radfed.federation.learning.messages import allowed_metrics
from radfed.federation.learning.training import new_model
from radfed.federation.site import membership_audit
from radfed.federation.site import rounds as site_code
from radfed.federation.site.config import SiteConfig
from radfed.federation.site.membership_audit import (
    AuditSettings,
    reference_confidences,
    study_loss,
    study_losses,
)
from radfed.inference.model.arbiter import DeviceArbiter
from radfed.inference.model.taskspec import TaskSpec
from radfed.inference.model.windows import Prediction


def final_message(planned_spec: TaskSpec, audit: str, **overrides: object) -> site_code.RoundPlan:
    assert planned_spec.plan is not None
    config: dict[str, object] = {
        "job": f"audit-{audit}",
        "server-round": 1,
        "num-server-rounds": 1,
        "local-steps": 2,
        "epsilon": 0.0,
        "held-out-fraction": 0.5,
        "membership-audit": audit,
        "membership-references": 2,
        "membership-steps": 1,
        "plan": planned_spec.plan.to_json(),
    }
    return site_code.RoundPlan.from_config(config | overrides)


@pytest.fixture
def site(tmp_path: Path, synth_root: Path) -> SiteConfig:
    return SiteConfig.from_node_config(
        {"data": str(synth_root / "site-1"), "state-dir": str(tmp_path / "state"), "site-name": "site-1"}
    )


def test_the_final_evaluation_carries_both_attacks_and_nothing_per_study(
    site: SiteConfig, planned_spec: TaskSpec
) -> None:
    arrays = site_code.model_to_arrays(new_model(planned_spec, seed=0))
    metrics = site_code.evaluate_round(site, final_message(planned_spec, "lira"), arrays)
    assert allowed_metrics(metrics) == metrics
    sent = {k: v for k, v in metrics.items() if k.startswith("membership_")}
    assert set(sent) == set(METRICS)
    assert all(isinstance(v, int | float) for v in sent.values())  # scalars: no list of scores
    members, non_members = sent["membership_members"], sent["membership_non_members"]
    assert members >= 1 and non_members >= 1 and members + non_members == metrics["studies_usable"]
    for name in ("membership_loss_auc", "membership_lira_auc"):
        assert 0.0 <= sent[name] <= 1.0
    assert sent["membership_references"] == 2


def test_off_sends_no_audit(site: SiteConfig, planned_spec: TaskSpec) -> None:
    arrays = site_code.model_to_arrays(new_model(planned_spec, seed=0))
    metrics = site_code.evaluate_round(site, final_message(planned_spec, "off"), arrays)
    assert "eval_studies" in metrics and not any(k.startswith("membership_") for k in metrics)


def test_a_right_prediction_has_a_lower_study_loss_than_a_wrong_one(planned_spec: TaskSpec) -> None:
    lesions = np.zeros((4, 8, 8), dtype=np.uint8)
    lesions[1:3, 2:5, 2:5] = 1
    sample = TrainingSample("ab12", np.zeros((3, 4, 8, 8), dtype=np.float16), lesions, label=1)
    right = Prediction(np.where(lesions > 0, 0.95, 0.02).astype(np.float32), 0.9, 1)
    wrong = Prediction(np.where(lesions > 0, 0.05, 0.6).astype(np.float32), 0.1, 1)
    assert study_loss(right, sample, planned_spec) < study_loss(wrong, sample, planned_spec)
    unlabelled = replace(sample, label=-1)  # the classification term needs a known label
    assert study_loss(right, unlabelled, planned_spec) < study_loss(right, sample, planned_spec)


def test_lira_references_of_a_fine_tuning_job_start_from_its_starting_model(
    synth_root: Path, planned_spec: TaskSpec
) -> None:
    """At a learning rate too small to move a weight, a reference model is its starting model: from the job's
    starting model every reference scores the studies as that model does; from random weights they do not."""
    samples = cohort_from_sources(planned_spec, [str(synth_root / "site-1")]).samples_for(None)
    start = new_model(planned_spec, seed=7)
    expected = logit_confidence(study_losses(start, samples, planned_spec))
    settings = AuditSettings(
        MembershipAudit.LIRA,
        references=2,
        reference_steps=1,
        learning_rate=1e-12,
        initial=site_code.model_to_arrays(start),
    )
    confidence, _ = reference_confidences(samples, planned_spec, settings)
    assert confidence.shape == (2, len(samples))
    np.testing.assert_allclose(confidence, np.broadcast_to(expected, confidence.shape), atol=1e-3)
    fresh, _ = reference_confidences(samples, planned_spec, replace(settings, initial=None))
    assert np.abs(fresh - expected).max() > 1e-2


def test_a_fine_tuning_job_audits_from_its_starting_model(
    site: SiteConfig, planned_spec: TaskSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 1 keeps the job's starting model, round 2 leaves it, the final evaluation hands it to LiRA; a site not
    asked in round 1 sends the loss attack only; a job from random weights keeps nothing."""
    audits: list[AuditSettings] = []
    monkeypatch.setattr(site_code, "audit_model", lambda *args, **_: audits.append(args[4]) or {})
    start = site_code.model_to_arrays(new_model(planned_spec, seed=3))
    later = site_code.model_to_arrays(new_model(planned_spec, seed=4))
    tuned = {"base-model": "/coordinator/base", "job": "tuned", "num-server-rounds": 2}
    site_code.train_round(site, final_message(planned_spec, "lira", **tuned), start)
    site_code.train_round(site, final_message(planned_spec, "lira", **tuned, **{"server-round": 2}), later)
    kept = site_code.load_starting_model(site.job_dir("tuned"))
    assert kept is not None and all(np.array_equal(k, a) for k, a in zip(kept, start, strict=True))
    site_code.evaluate_round(site, final_message(planned_spec, "lira", **tuned), later)
    assert audits[-1].audit is MembershipAudit.LIRA and audits[-1].initial is not None
    assert all(np.array_equal(k, a) for k, a in zip(audits[-1].initial, start, strict=True))
    site_code.evaluate_round(site, final_message(planned_spec, "lira", **tuned | {"job": "tuned-late"}), later)
    assert audits[-1].audit is MembershipAudit.LOSS and audits[-1].initial is None
    scratch = final_message(planned_spec, "lira", job="scratch")
    site_code.train_round(site, scratch, start)
    assert site_code.load_starting_model(site.job_dir("scratch")) is None
    site_code.evaluate_round(site, scratch, later)
    assert audits[-1].audit is MembershipAudit.LIRA and audits[-1].initial is None


def test_the_audit_scores_studies_in_one_pass_without_mirroring_and_clinical_work_first(
    planned_spec: TaskSpec, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[bool, object]] = []
    monkeypatch.setattr(
        membership_audit,
        "predict_samples",
        lambda model, samples, spec, arbiter=None: calls.append((spec.inference.mirror, arbiter)) or [],
    )
    arbiter = DeviceArbiter(tmp_path)
    assert membership_audit.study_losses(new_model(planned_spec, seed=0), [], planned_spec, arbiter).size == 0
    assert planned_spec.inference.mirror  # the job's spec mirrors; the audit does not
    assert calls == [(False, arbiter)]  # and its passes take their turns on the node's device, as training does
