"""A site asked again for the round it trained last, from the same global model (the coordinator restarted
and resumed from its checkpoint), sends the same reply and spends no more privacy budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radfed.federation.learning.networks import TrainableScope, scope_parameters
from radfed.federation.learning.training import new_model
from radfed.federation.site import rounds as site_code
from radfed.federation.site.config import SiteConfig
from radfed.inference.model.taskspec import TaskSpec


def test_a_repeated_round_is_replayed_not_trained_again(
    tmp_path: Path, synth_root: Path, planned_spec: TaskSpec
) -> None:
    site = SiteConfig.from_node_config(
        {"data": str(synth_root / "site-1"), "state-dir": str(tmp_path / "state"), "site-name": "site-1"}
    )
    config = {"job": "replay", "server-round": 1, "num-rounds": 3, "local-steps": 2, "epsilon": 8.0, "delta": 1e-5}
    assert planned_spec.plan is not None
    plan = site_code.RoundPlan.from_config(config | {"plan": planned_spec.plan.to_json()})
    start = site_code.model_to_arrays(new_model(planned_spec))

    trained, first = site_code.train_round(site, plan, start)
    spent = site_code.privacy_spent(site, "replay", 1e-5)
    assert 0 < first["epsilon"] == spent and "round_replayed" not in first

    again, second = site_code.train_round(site, plan, start)
    assert second["round_replayed"] == 1 and second["epsilon"] == first["epsilon"]
    assert site_code.privacy_spent(site, "replay", 1e-5) == spent  # nothing spent twice
    for a, b in zip(trained, again, strict=True):
        np.testing.assert_array_equal(a, b)

    # a different global model for that round is new work: it trains (and spends) again
    moved = [a + np.float32(0.01) for a in start]
    _, third = site_code.train_round(site, plan, moved)
    assert "round_replayed" not in third and site_code.privacy_spent(site, "replay", 1e-5) > spent


def test_a_site_asked_to_train_the_norms_only_sends_the_rest_unchanged(
    tmp_path: Path, synth_root: Path, planned_spec: TaskSpec
) -> None:
    site = SiteConfig.from_node_config(
        {"data": str(synth_root / "site-1"), "state-dir": str(tmp_path / "state"), "site-name": "site-1"}
    )
    config = {"job": "norms", "server-round": 1, "num-rounds": 2, "local-steps": 2, "epsilon": 0.0}
    assert planned_spec.plan is not None
    plan = site_code.RoundPlan.from_config(config | {"trainable": "norms", "plan": planned_spec.plan.to_json()})
    model = new_model(planned_spec)
    scope = {id(p) for p in scope_parameters(model, TrainableScope.NORMS)}
    scope_names = {name for name, p in model.named_parameters() if id(p) in scope}
    in_scope = [name in scope_names for name in model.state_dict()]  # the order of the arrays sent
    start = site_code.model_to_arrays(model)
    assert len(start) == len(in_scope) and 0 < sum(in_scope) < len(in_scope)

    trained, metrics = site_code.train_round(site, plan, start)
    assert "epsilon" not in metrics  # no DP in this job
    changed = [not np.array_equal(a, b) for a, b in zip(start, trained, strict=True)]
    assert any(changed)
    assert not any(c and not s for c, s in zip(changed, in_scope, strict=True))  # nothing outside the scope moved


def test_a_site_holding_out_too_few_studies_sends_no_figures_and_runs_no_evaluation(
    tmp_path: Path, synth_root: Path, planned_spec: TaskSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluation-min-studies: figures a site may not send are not computed either (a pass of the model over
    its held-out studies every round, for figures then dropped)."""
    site = SiteConfig.from_node_config(
        {"data": str(synth_root / "site-1"), "state-dir": str(tmp_path / "state"), "site-name": "site-1"}
    )
    assert planned_spec.plan is not None
    config = {"job": "few", "server-round": 1, "num-rounds": 1, "local-steps": 1, "epsilon": 0.0}
    config["plan"] = planned_spec.plan.to_json()
    everyone = site_code._cohort_split(site, site_code.RoundPlan.from_config(config | {"held-out-fraction": 0.0}))[2]
    # hold out every study but the one of the highest hash bucket (is_held_out)
    config["held-out-fraction"] = max(int(s.key[:8], 16) % 1000 for s in everyone) / 1000
    held = len(site_code._cohort_split(site, site_code.RoundPlan.from_config(config))[3])
    assert held >= 2
    evaluated: list[int] = []
    real = site_code.evaluate_model

    def counting(model, samples, spec, arbiter=None):  # type: ignore[no-untyped-def]
        evaluated.append(len(samples))
        return real(model, samples, spec, arbiter)

    monkeypatch.setattr(site_code, "evaluate_model", counting)
    start = site_code.model_to_arrays(new_model(planned_spec))
    for minimum, sent in ((held + 1, False), (held, True)):
        plan = site_code.RoundPlan.from_config(config | {"job": f"few-{minimum}", "evaluation-min-studies": minimum})
        _, metrics = site_code.train_round(site, plan, start)
        figures = {k for k in metrics if k.startswith("eval_")}
        if sent:
            assert evaluated == [held] and metrics["eval_studies"] == held and "evaluation_withheld" not in metrics
        else:
            assert not evaluated and metrics["evaluation_withheld"] == 1 and not figures, metrics
