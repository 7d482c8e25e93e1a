"""The federation as hospitals run it, on loopback: four real Orthanc instances with different synthetic
(non-IID) studies, a SuperLink with TLS and SuperNode authentication, four SuperNodes, DP-SGD, federated
harmonisation, three rounds with evaluation, ONNX artifact, model card and rollout into each site's
registry, where a real ``radfed serve`` activates it. Faults injected on purpose: a node with an
unregistered key, a hospital that sends scaled (x20) updates, and a hospital killed in the middle of a round.
The flagged hospital is named to every other one: its poisoning alerts reach each site's node, whose API, metrics
and Orthanc Explorer box show them, and a node set to refuse flagged models does so until its admin resolves them.
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
import requests
from playwright.sync_api import sync_playwright

from radfed.federation.coordinator.checkpoint import read_metrics
from radfed.federation.job.alerts import AlertStore
from radfed.federation.lab.loopback import FederationOptions, LoopbackFederation
from radfed.federation.learning.messages import (
    ALERT_FIELDS,
    ALLOWED_METRICS,
    ALLOWED_VECTORS,
    FINGERPRINT_PREFIX,
    LANDMARK_PREFIX,
)
from radfed.federation.learning.training import new_model
from radfed.inference.model.artifact import load_artifact
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancProcess, free_port, stop_orthancs
from tests.federation.flower_apps import plumbing_task
from tests.plugin.node_harness import TOKEN, NodeProcess

pytestmark = [pytest.mark.orthanc, pytest.mark.flower, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]


def poisoning_app(tmp_path: Path) -> Path:
    app = tmp_path / "flower-app"
    shutil.copytree(ROOT / "deploy" / "flower", app)
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            'clientapp = "radfed.federation.site.client_app:app"',
            'clientapp = "tests.federation.poisoned_client_app:app"',
        )
    )
    return app


PLUGIN_SCRIPT = ROOT / "deploy" / "orthanc" / "radfed_orthanc_plugin.py"
CHROMIUM = "/usr/bin/chromium"  # Debian's package (make install-system)


def with_radfed_plugin(orthanc: OrthancProcess, node_url: str) -> None:
    """Add radfed's Orthanc plugin to a stopped site's Orthanc configuration (it restarts with it)."""
    path = orthanc.workdir / "orthanc.json"
    config = json.loads(path.read_text())
    config["Plugins"].append(str(Path(config["Plugins"][0]).with_name("libOrthancPython.so")))
    config |= {"PythonScript": str(PLUGIN_SCRIPT), "Radfed": {"Url": node_url, "Token": TOKEN}}
    path.write_text(json.dumps(config))


def explorer_status_box(orthanc: OrthancProcess, study_id: str) -> str:
    """The radfed box of a study's page in Orthanc Explorer, in headless Chromium, reached as a user does: the
    explorer first, then the study."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(
                http_credentials={"username": orthanc.options.username, "password": orthanc.options.password}
            )
            page = context.new_page()
            page.goto(f"{orthanc.url}/app/explorer.html")
            page.wait_for_function("() => window.jQuery && jQuery.mobile && jQuery.mobile.activePage")
            page.evaluate(f"() => {{ location.hash = '#study?uuid={study_id}'; }}")
            page.wait_for_selector("#radfed-status .radfed-alert", timeout=30_000)
            return page.inner_text("#radfed-status")
        finally:
            browser.close()


def wait_for_round(out: Path, number: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(m.get("round") == number for m in read_metrics(out)):
            return
        time.sleep(1)
    raise AssertionError(f"round {number} did not finish in {timeout_s:.0f} s")


def test_four_hospitals_secure_dp_poisoned_and_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the SuperNodes import the fault-injecting ClientApp
    names = [f"hospital-{i}" for i in range(1, 5)]
    node_dirs = {name: tmp_path / f"node-{name}" for name in names}  # each hospital's radfed node
    extra = {name: f"node-state-dir='{node_dirs[name] / 'state'}'" for name in names}
    extra["hospital-4"] += " poison='scale'"
    federation = LoopbackFederation(
        tmp_path / "fed",
        poisoning_app(tmp_path),
        FederationOptions(sites=4, studies_per_site=4, seed=3, small=True, secure=True),
        node_config_extra=extra,
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
                "task": str(plumbing_task(tmp_path)),
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
    # hospital-2 holds out one study: under evaluation-min-studies (2) it sends no figures, and is named
    assert "hospital-1" in final["evaluation"]["sites"] and final["evaluation"]["withheld"] == ["hospital-2"]
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

    # poisoning alerts: what the coordinator told the sites carries only the allowed fields and names the
    # flagged site in every round; every later message repeated the earlier flags
    flags = {(r, "hospital-4", "update-norm") for r in (1, 2, 3)}
    told = [(r["type"], a) for r in replies for a in r["received_alerts"]]
    assert told and all(set(a) == ALERT_FIELDS for _, a in told), told
    assert {(a["round"], a["site"], a["rule"]) for _, a in told} == flags
    assert {(a["round"], a["site"], a["rule"]) for kind, a in told if kind == "evaluate"} == flags
    for name in names:  # every site kept them in its node's state folder (hospital-3 died in round 2)
        stored = AlertStore(node_dirs[name] / "state").alerts()
        kept = {(a.alert.server_round, a.alert.site, a.alert.rule.value) for a in stored}
        assert kept <= flags if name == "hospital-3" else kept == flags, (name, kept)
    listed = [(a["round"], a["site"], a["rule"]) for a in artifact.provenance["poisoning_alerts"]]
    assert listed == sorted(flags)
    assert all(f"| {r} | hospital-4 | update-norm |" in card for r in (1, 2, 3))

    # hospital-1's and hospital-2's nodes show the alerts; hospital-1's refuses the rolled-out model until its
    # admin resolves them, then activates it from its registry
    nodes: list[NodeProcess] = []
    try:
        for site in federation.sites[:2]:
            port = free_port()
            if site is federation.sites[0]:
                with_radfed_plugin(site.orthanc, f"http://127.0.0.1:{port}")
            site.orthanc.restart()
            settings = "refuse_flagged_models = true" if site is federation.sites[0] else ""
            node = NodeProcess(node_dirs[site.name], site.orthanc, None, port=port, node_settings=settings)
            node.env["RADFED_MODELS_DIR"] = str(site.models_dir)
            nodes.append(node)
            node.start()
            shown = node.get("/federation/alerts")
            assert {(a["round"], a["site"], a["rule"]) for a in shown} == flags
            assert not any(a["resolved"] for a in shown)
            assert 'radfed_federation_alerts_total{rule="update-norm"} 3.0' in node.get_text("/metrics")
        node, site = nodes[0], federation.sites[0]
        with OrthancClient(site.orthanc.endpoint) as client:
            study_id = client.get_json("/studies")[0]
            status = client.get_json(f"/radfed/study-status/{study_id}")
        assert sorted((a["round"], a["site"], a["rule"]) for a in status["alerts"]) == sorted(flags)
        box = explorer_status_box(site.orthanc, study_id)
        for r in (1, 2, 3):
            assert f"round {r}: the update of hospital-4 was flagged (update-norm)" in box, box

        assert node.get("/models") == [{"name": artifact.identity.name, "version": "1.0.0", "active": False}]
        activate = f"{node.url}/models/{artifact.identity.name}/1.0.0/activate"
        refused = requests.post(activate, headers=node.headers, timeout=10)
        assert refused.status_code == 409 and "3 unresolved poisoning alert(s)" in refused.json()["detail"]
        for alert in shown:
            node.post(f"/federation/alerts/{alert['id']}/resolve")
        assert "radfed_federation_alerts_unresolved 0.0" in node.get_text("/metrics")
        node.post(f"/models/{artifact.identity.name}/1.0.0/activate")
        active = node.get("/models/active")
        assert active["sha256"] == artifact.sha256
        assert active["provenance"]["training"] == "federated"
        assert "Traceback" not in site.orthanc.log_tail(400)
    finally:
        for node in nodes:
            node.stop()
        stop_orthancs([site.orthanc for site in federation.sites[:2]])
