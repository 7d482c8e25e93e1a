"""Poisoning alerts without Flower: what a round's config may carry about a flagged site (the allow-list),
pseudonyms, the coordinator's record of every flag (checkpoint, model card) and a node's alert store.
The real federation (Flower processes, a site flagged, every node told) is in test_federation_local.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from radfed.federation.coordinator.checkpoint import CoordinatorCheckpoint, model_card
from radfed.federation.job.alerts import (
    ALERTS_CONFIG_KEY,
    AlertStore,
    PoisoningAlert,
    UnresolvedAlertsError,
    alerts_from_config,
    federation_id,
    provenance_alerts,
)
from radfed.federation.job.run_config import RoundConfig, RunConfig
from radfed.federation.learning.aggregation import AnomalyRule
from radfed.federation.learning.messages import ALERT_FIELDS, ALERT_RULES, AlertLeakError, allowed_alert
from radfed.federation.site.config import SiteConfig
from radfed.federation.site.worker import keep_alerts

NORM, DIRECTION = AnomalyRule.UPDATE_NORM, AnomalyRule.UPDATE_DIRECTION
FLAGS = [
    PoisoningAlert("job-a", 1, "hospital-4", NORM),
    PoisoningAlert("job-a", 2, "hospital-2", DIRECTION),
    PoisoningAlert("job-a", 2, "hospital-4", NORM),
]


def _sent_entries(config: RoundConfig) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(str(config.to_record()[ALERTS_CONFIG_KEY]))
    return entries


def test_the_allow_list_knows_every_screening_rule() -> None:
    assert {rule.value for rule in AnomalyRule} == ALERT_RULES


def test_a_round_config_carries_each_flag_with_only_the_allowed_fields() -> None:
    config = RoundConfig(RunConfig(job="job-a"), 3, alerts=tuple(FLAGS))
    entries = _sent_entries(config)
    assert [set(e) for e in entries] == [ALERT_FIELDS] * 3
    assert entries[0] == {"round": 1, "site": "hospital-4", "rule": "update-norm"}
    assert RoundConfig.from_record(config.to_record()).alerts == tuple(FLAGS)  # the site reads back the same


def test_without_flags_the_config_has_no_alert_key() -> None:
    assert ALERTS_CONFIG_KEY not in RoundConfig(RunConfig(), 1).to_record()


@pytest.mark.parametrize(
    "entry",
    [
        {"round": 1, "site": "hospital-4", "rule": "update-norm", "reason": "update norm 41.2 vs median 2.1"},
        {"round": 1, "site": "hospital-4"},
        {"round": 1, "site": "St Mary's, patient DOE^JOHN", "rule": "update-norm"},
        {"round": True, "site": "hospital-4", "rule": "update-norm"},
        {"round": 0, "site": "hospital-4", "rule": "update-norm"},
        {"round": 1, "site": "hospital-4", "rule": "looked odd"},
        ["hospital-4"],
    ],
)
def test_a_config_entry_outside_the_allow_list_is_refused(entry: object) -> None:
    with pytest.raises(AlertLeakError):
        alerts_from_config(json.dumps([entry]), "job-a")
    with pytest.raises(AlertLeakError):
        allowed_alert(entry)


def test_a_site_name_that_is_not_an_id_travels_as_a_hash() -> None:
    named = federation_id("St Mary's Radiology")
    assert named.startswith("site-") and " " not in named and named == federation_id("St Mary's Radiology")
    assert federation_id("hospital-4") == "hospital-4"


def test_anonymised_alerts_name_no_site_and_keep_one_pseudonym_per_site(tmp_path: Path) -> None:
    from radfed.federation.coordinator.server_app import RoundDriver

    state = CoordinatorCheckpoint(flags=list(FLAGS))
    run = RunConfig(job="job-a", anonymise_alerts=True, out_dir=str(tmp_path))
    record = RoundDriver(cast(Any, None), run).config(3, state)  # what every site receives for round 3
    sent = str(record[ALERTS_CONFIG_KEY])
    assert "hospital" not in sent
    assert [e["site"] for e in json.loads(sent)] == ["flagged-site-1", "flagged-site-2", "flagged-site-1"]
    named = RoundDriver(cast(Any, None), RunConfig(job="job-a", out_dir=str(tmp_path))).config(3, state)
    assert [e["site"] for e in json.loads(str(named[ALERTS_CONFIG_KEY]))] == ["hospital-4", "hospital-2", "hospital-4"]


def test_the_coordinators_checkpoint_keeps_every_flag(tmp_path: Path) -> None:
    CoordinatorCheckpoint(completed_round=2, flags=list(FLAGS)).save(tmp_path)
    loaded = CoordinatorCheckpoint.load(tmp_path)
    assert loaded is not None and loaded.flags == FLAGS


def test_the_model_card_lists_every_flag() -> None:
    card = model_card(
        job="job-a",
        model_key="m:1",
        rounds=3,
        aggregation="fedavg",
        state=CoordinatorCheckpoint(),
        epsilon_budget=0,
        delta=1e-5,
        final_evaluation=None,
        alerts=FLAGS,
    )
    rows = [line for line in card.splitlines() if line.startswith("| ") and "update-" in line]
    assert rows == [f"| {a.server_round} | {a.site} | {a.rule} | {a.alert_id} |" for a in FLAGS]
    clean = model_card(
        job="j", model_key="m:1", rounds=3, aggregation="fedavg", state=CoordinatorCheckpoint(),
        epsilon_budget=0, delta=1e-5, final_evaluation=None,
    )  # fmt: skip
    assert "None: no site's update was flagged in 3 rounds." in clean


def test_the_site_worker_keeps_alerts_once_in_its_nodes_state_folder(tmp_path: Path) -> None:
    site = SiteConfig("hospital-1", ("data",), tmp_path / "site", node_state_dir=tmp_path / "node")
    keep_alerts(site, FLAGS[:2])
    keep_alerts(site, FLAGS)  # the next round's config repeats the earlier flags
    stored = AlertStore(tmp_path / "node").alerts()
    assert [r.alert for r in stored] == FLAGS
    assert all(r.resolved_at is None for r in stored)
    assert not (tmp_path / "site").exists()


def test_a_model_with_unresolved_alerts_is_refused_until_they_are_resolved(tmp_path: Path) -> None:
    store = AlertStore(tmp_path)
    store.record(FLAGS[:1])
    provenance = {"job": "job-a", "poisoning_alerts": [a.as_dict() for a in FLAGS[:2]]}
    with pytest.raises(UnresolvedAlertsError) as refused:
        store.require_resolved(provenance_alerts(provenance), "model m:1")
    assert FLAGS[0].alert_id in str(refused.value) and FLAGS[1].alert_id in str(refused.value)
    assert [r.alert for r in store.alerts()] == FLAGS[:2]  # the flag only the model brought is shown now
    for alert in FLAGS[:2]:
        resolved = store.resolve(alert.alert_id)
        assert resolved is not None and resolved.resolved_at is not None
    store.require_resolved(provenance_alerts(provenance), "model m:1")
    assert store.resolve("0123456789abcdef") is None
    store.require_resolved(provenance_alerts({"training": "local"}), "a local model")  # nothing to resolve
