"""The node's side of poisoning alerts, on the node's real app and state folder (no Orthanc needed: these
routes never call it): ``GET /federation/alerts``, resolving one, the ``/metrics`` counter, and the setting that
refuses a model whose federated job has unresolved alerts. The alerts are written as in a federation, by the
site worker's ``keep_alerts`` into the node's state folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from radfed.federation.job.alerts import PROVENANCE_KEY, PoisoningAlert
from radfed.federation.learning.aggregation import AnomalyRule
from radfed.federation.site.config import SiteConfig
from radfed.federation.site.worker import keep_alerts
from radfed.inference.model.artifact import MODEL_FILE, load_artifact, write_artifact
from radfed.inference.pipeline.findings import ModelIdentity
from radfed.plugin.node.api import create_app
from radfed.plugin.node.config import load_config
from radfed.plugin.node.service import NodeService

TOKEN = "test-token-not-secret"
FLAGS = [
    PoisoningAlert("job-a", 1, "hospital-4", AnomalyRule.UPDATE_NORM),
    PoisoningAlert("job-a", 2, "hospital-4", AnomalyRule.UPDATE_NORM),
    PoisoningAlert("job-a", 2, "flagged-site-2", AnomalyRule.UPDATE_DIRECTION),
]
NodeApp = Callable[..., tuple[NodeService, TestClient]]


@pytest.fixture
def node_app(tmp_path: Path) -> Iterator[NodeApp]:
    clients: list[TestClient] = []

    def make(settings: str = "") -> tuple[NodeService, TestClient]:
        path = tmp_path / f"node-{len(clients)}.toml"
        path.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\n{settings}\n')
        service = NodeService(load_config(path, {"RADFED_API_TOKEN": TOKEN}))
        client = TestClient(create_app(service), headers={"Authorization": f"Bearer {TOKEN}"})
        clients.append(client)
        return service, client

    yield make
    for client in clients:
        client.close()


def _received(service: NodeService, alerts: list[PoisoningAlert]) -> None:
    """As the site worker beside this node stores what a round's config brought."""
    state = service.config.state_dir
    keep_alerts(SiteConfig("hospital-1", ("data",), state / "site", node_state_dir=state), alerts)


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, (name, text)
    return values[0]


def test_received_alerts_are_listed_with_their_fields(node_app: NodeApp) -> None:
    service, client = node_app()
    assert client.get("/federation/alerts").json() == []
    _received(service, FLAGS)
    listed = client.get("/federation/alerts").json()
    assert [(a["job"], a["round"], a["site"], a["rule"]) for a in listed] == [
        ("job-a", 1, "hospital-4", "update-norm"),
        ("job-a", 2, "hospital-4", "update-norm"),
        ("job-a", 2, "flagged-site-2", "update-direction"),
    ]
    assert [a["id"] for a in listed] == [a.alert_id for a in FLAGS]
    assert all(a["received_at"] and a["resolved"] is False for a in listed)
    assert client.get("/federation/alerts", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_the_metrics_count_alerts_by_rule_and_the_unresolved_ones(node_app: NodeApp) -> None:
    service, client = node_app()
    _received(service, FLAGS[:1])
    text = client.get("/metrics").text
    assert _metric(text, 'radfed_federation_alerts_total{rule="update-norm"}') == 1
    assert _metric(text, 'radfed_federation_alerts_total{rule="update-direction"}') == 0
    _received(service, FLAGS)  # the next round repeats the first alert: counted once
    text = client.get("/metrics").text
    assert _metric(text, 'radfed_federation_alerts_total{rule="update-norm"}') == 2
    assert _metric(text, 'radfed_federation_alerts_total{rule="update-direction"}') == 1
    assert _metric(text, "radfed_federation_alerts_unresolved") == 3
    resolved = client.post(f"/federation/alerts/{FLAGS[0].alert_id}/resolve").json()
    assert resolved["resolved"] is True and resolved["id"] == FLAGS[0].alert_id
    text = client.get("/metrics").text
    assert _metric(text, "radfed_federation_alerts_unresolved") == 2
    assert _metric(text, 'radfed_federation_alerts_total{rule="update-norm"}') == 2  # a counter never goes down
    assert [a["id"] for a in client.get("/federation/alerts", params={"resolved": "false"}).json()] == [
        FLAGS[1].alert_id,
        FLAGS[2].alert_id,
    ]


def test_resolving_an_unknown_or_malformed_alert_id_is_refused(node_app: NodeApp) -> None:
    _, client = node_app()
    assert client.post("/federation/alerts/0123456789abcdef/resolve").status_code == 404
    assert client.post("/federation/alerts/..%2Fstate/resolve").status_code in (404, 422)
    assert client.post("/federation/alerts/XYZ/resolve").status_code == 422


@pytest.fixture
def flagged_artifact(tmp_path: Path, tiny_artifact: Path) -> Path:
    """The tiny model again, as if trained in a federated job whose screening flagged two updates."""
    base = load_artifact(tiny_artifact)
    folder = tmp_path / "flagged"
    write_artifact(
        folder,
        tiny_artifact / MODEL_FILE,
        ModelIdentity(base.identity.name, "0.0.2"),
        base.spec,
        provenance={"training": "federated", "job": "job-a", PROVENANCE_KEY: [a.as_dict() for a in FLAGS[:2]]},
    )
    return folder


def test_a_node_that_refuses_flagged_models_activates_one_only_once_its_alerts_are_resolved(
    node_app: NodeApp, tiny_artifact: Path, flagged_artifact: Path
) -> None:
    service, client = node_app("refuse_flagged_models = true")
    _received(service, FLAGS[:1])  # the node took part in round 1 only
    name = service.registry.install(flagged_artifact).identity.name
    service.registry.install(tiny_artifact)
    refused = client.post(f"/models/{name}/0.0.2/activate")
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["error"] == "UnresolvedAlertsError"
    assert "2 unresolved poisoning alert(s)" in body["detail"] and "refuse_flagged_models" in body["detail"]
    assert all(a.alert_id in body["detail"] for a in FLAGS[:2])
    assert client.get("/models/active").status_code == 404  # nothing was activated
    # the flag of round 2 came with the model: the node shows it, and the admin can resolve it
    assert [a["id"] for a in client.get("/federation/alerts").json()] == [a.alert_id for a in FLAGS[:2]]
    assert client.post(f"/models/{name}/0.0.1/activate").json() == {"active": f"{name}:0.0.1"}  # no flags
    for alert in FLAGS[:2]:
        assert client.post(f"/federation/alerts/{alert.alert_id}/resolve").status_code == 200
    assert client.post(f"/models/{name}/0.0.2/activate").json() == {"active": f"{name}:0.0.2"}
    assert client.get("/models/active").json()["provenance"]["job"] == "job-a"


def test_by_default_a_flagged_model_is_activated(node_app: NodeApp, flagged_artifact: Path) -> None:
    service, client = node_app()
    name = service.registry.install(flagged_artifact).identity.name
    assert client.post(f"/models/{name}/0.0.2/activate").json() == {"active": f"{name}:0.0.2"}
