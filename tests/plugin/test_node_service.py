"""The hospital node against a real Orthanc: results appear once, survive kill -9 and an Orthanc outage,
and bad studies fail their own jobs with a reason while the others finish."""

from __future__ import annotations

import copy
import io
import json
import urllib.parse
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pydicom
import requests

from radfed.dicom_sr.validation import check_dciodvfy
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.redaction import uid_digest
from radfed.inference.testing.orthanc_server import OrthancProcess
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import SyntheticStudy, render_study
from radfed.inference.testing.synthetic.writer import study_datasets, upload_study
from tests.plugin.node_harness import TOKEN, NodeProcess, wait_until


def _studies(count: int, seed: int = 5) -> list[SyntheticStudy]:
    return [render_study(site_profile(1 + n % 3, small=True), 1 + n // 3, seed) for n in range(count)]


def _results_per_study(client: OrthancClient) -> dict[str, Counter[str]]:
    """Modality counts of radfed's result instances (Manufacturer radfed) per StudyInstanceUID."""
    counts: dict[str, Counter[str]] = {}
    for study_id in client.studies():
        study = client.study(study_id)
        uid = study["MainDicomTags"]["StudyInstanceUID"]
        counts[uid] = Counter()
        for series_id in study["Series"]:
            series = client.series(series_id)
            if series["MainDicomTags"].get("Manufacturer") == "radfed":
                counts[uid][series["MainDicomTags"]["Modality"]] += len(series["Instances"])
    return counts


def _finished(node: NodeProcess, expected: int) -> Callable[[], bool]:
    return lambda: len(node.jobs("done")) + len(node.jobs("failed")) >= expected


def test_results_appear_once_and_validate(
    tmp_path: Path, orthanc: OrthancProcess, orthanc_client: OrthancClient, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(orthanc)
    node.start()
    studies = _studies(3)
    for study in studies:
        upload_study(study, orthanc_client)
    wait_until(_finished(node, 3), 120, "3 jobs", node.log_tail)
    jobs = node.jobs()
    assert [j["state"] for j in jobs] == ["done"] * 3, [j["reason"] for j in jobs]
    for job in jobs:
        # Fetch, load and preprocess ran in the job, or before StableStudy when the study was prepared ahead.
        ahead = job["result"]["prepared_ahead"]
        assert set(job["timings_s"]) >= (
            {"ahead_load", "ahead_preprocess"} if ahead else {"fetch", "load", "preprocess"}
        ) | {
            "model",
            "postprocess",
            "encode",
            "qa",
            "store",
            "total",
        }
        assert job["result"]["provider"] == "CPUExecutionProvider"
        assert any("-> t2w" in line for line in job["selection"])
    results = _results_per_study(orthanc_client)
    for study in studies:
        job = next(j for j in jobs if j["study_instance_uid"] == study.identity.study_instance_uid)
        expected = Counter({"SR": 1, **({"SEG": 1} if job["result"]["lesions"] else {})})
        assert results[study.identity.study_instance_uid] == expected
    # Every stored result validates.
    for job in jobs:
        for key in ("seg_sop_instance_uid", "sr_sop_instance_uid"):
            uid = job["result"][key]
            if uid is None:
                continue
            path = tmp_path / f"{uid}.dcm"
            path.write_bytes(orthanc_client.instance_bytes(orthanc_client.find_instance(uid) or ""))
            assert check_dciodvfy(path).passed, check_dciodvfy(path).detail

    # Re-upload everything and ask for the studies again: StableStudy fires again, nothing new is made.
    for study in studies:
        upload_study(study, orthanc_client)
        node.post(f"/studies/{study.identity.study_instance_uid}/run")
    wait_until(lambda: node.ready()["inbox"] == 0, 60, "inbox drained", node.log_tail)
    assert len(node.jobs()) == 3
    assert _results_per_study(orthanc_client) == results


def test_kill_minus_9_mid_batch_loses_and_duplicates_nothing(
    orthanc: OrthancProcess, orthanc_client: OrthancClient, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(orthanc)
    node.start()
    studies = _studies(20, seed=8)
    for study in studies:
        upload_study(study, orthanc_client)
    wait_until(lambda: len(node.jobs("done")) >= 4, 180, "4 jobs done", node.log_tail)
    node.kill()
    node.start()
    wait_until(_finished(node, 20), 300, "20 jobs", node.log_tail)
    jobs = node.jobs()
    assert len(jobs) == 20 and {j["state"] for j in jobs} == {"done"}
    results = _results_per_study(orthanc_client)
    assert len(results) == 20
    for job in jobs:
        got = results[job["study_instance_uid"]]
        assert got["SR"] == 1, got
        assert got["SEG"] == (1 if job["result"]["lesions"] else 0), got


def test_orthanc_outage_mid_batch(
    orthanc: OrthancProcess, orthanc_client: OrthancClient, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(orthanc)
    node.start()
    studies = _studies(6, seed=9)
    for study in studies:
        upload_study(study, orthanc_client)
    wait_until(lambda: len(node.jobs("done")) >= 1, 120, "a first job", node.log_tail)
    orthanc.stop()
    wait_until(lambda: not node.ready()["orthanc_reachable"], 30, "the node to notice the outage", node.log_tail)
    import time

    time.sleep(30)
    assert node.get("/health") == {"status": "alive"}
    orthanc.restart()
    wait_until(_finished(node, 6), 240, "6 jobs after the outage", node.log_tail)
    assert {j["state"] for j in node.jobs()} == {"done"}, [j["reason"] for j in node.jobs()]
    with OrthancClient(orthanc.endpoint) as client:
        results = _results_per_study(client)
    assert all(r["SR"] == 1 for r in results.values()) and len(results) == 6


def test_a_study_whose_stable_event_died_with_orthanc_is_still_processed(
    orthanc: OrthancProcess, orthanc_client: OrthancClient, node_factory: Callable[..., NodeProcess]
) -> None:
    """Orthanc computes StableStudy in memory: SIGKILL inside StableAge loses it for good. The node remembers
    which studies changed and examines those that stay quiet without one."""
    node = node_factory(orthanc, node_settings="reconcile_quiet_s = 4.0\nreconcile_interval_s = 1.0")
    node.start()
    first, lost = _studies(2, seed=14)
    upload_study(first, orthanc_client)
    wait_until(_finished(node, 1), 120, "the first job", node.log_tail)
    upload_study(lost, orthanc_client)
    orthanc.kill()  # at once: well inside the test Orthanc's StableAge of 2 s
    orthanc.restart()
    wait_until(_finished(node, 2), 120, "the study that never became stable", node.log_tail)
    by_study = {j["study_instance_uid"]: j for j in node.jobs()}
    assert by_study[lost.identity.study_instance_uid]["state"] == "done"
    assert "never got StableStudy" in node.log_tail(200)
    assert node.ready()["loops"]["reconciler"]["status"] == "ok"


def test_a_new_ledger_follows_from_now_and_history_is_reprocessed_only_when_asked(
    orthanc: OrthancProcess, orthanc_client: OrthancClient, node_factory: Callable[..., NodeProcess]
) -> None:
    old, new = _studies(2, seed=15)
    upload_study(old, orthanc_client)
    old_id = orthanc_client.find_study(old.identity.study_instance_uid)
    wait_until(lambda: orthanc_client.get_json(f"/studies/{old_id}")["IsStable"], 30, "the old study to be stable")
    node = node_factory(orthanc)  # a ledger that does not exist yet, beside an Orthanc with history
    node.start()
    upload_study(new, orthanc_client)
    wait_until(_finished(node, 1), 120, "the new study's job", node.log_tail)
    assert [j["study_instance_uid"] for j in node.jobs()] == [new.identity.study_instance_uid]
    assert "new ledger: following Orthanc from change" in node.log_tail(200)
    assert node.post("/reprocess?since=20000101") == {"since": "20000101", "studies": 2}
    wait_until(_finished(node, 2), 120, "the old study, asked for", node.log_tail)
    jobs = node.jobs()
    assert sorted(j["study_instance_uid"] for j in jobs) == sorted(s.identity.study_instance_uid for s in (old, new)), (
        "the new study's job is found again, not repeated"
    )
    assert {j["state"] for j in jobs} == {"done"}


def _upload(datasets: list[pydicom.Dataset], client: OrthancClient) -> None:
    for ds in datasets:
        client.upload_dataset(ds)


def test_malformed_studies_fail_their_own_jobs(
    orthanc: OrthancProcess, orthanc_client: OrthancClient, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(orthanc)
    node.start()
    good = _studies(2, seed=10)
    missing, corrupt, wrong, poison = (render_study(site_profile(2, small=True), n, 11) for n in (1, 2, 3, 4))
    # Headers that break series examination itself (seen: the examiner raised once a second, forever).
    poisoned = [copy.deepcopy(ds) for ds in study_datasets(poison)]
    for ds in poisoned:
        if ds.Modality == "MR":
            ds.ImageOrientationPatient = [1.0]
    _upload(poisoned, orthanc_client)
    _upload(
        [
            ds
            for ds in study_datasets(missing)
            if ds.SeriesInstanceUID != missing.series[Sequence.DWI][0].SeriesInstanceUID
        ],
        orthanc_client,
    )
    damaged = [copy.deepcopy(ds) for ds in study_datasets(corrupt)]
    victim = next(ds for ds in damaged if ds.SeriesInstanceUID == corrupt.series[Sequence.T2W][0].SeriesInstanceUID)
    victim.PixelData = victim.PixelData[: len(victim.PixelData) // 3]
    _upload(damaged, orthanc_client)
    as_ct = [copy.deepcopy(ds) for ds in study_datasets(wrong) if ds.Modality == "MR"]
    for ds in as_ct:
        ds.Modality = "CT"
    _upload(as_ct, orthanc_client)
    for study in good:
        upload_study(study, orthanc_client)
    wait_until(_finished(node, 6), 180, "6 jobs", node.log_tail)
    by_study = {j["study_instance_uid"]: j for j in node.jobs()}
    assert by_study[missing.identity.study_instance_uid]["state"] == "failed"
    assert "no series matched rule dwi" in by_study[missing.identity.study_instance_uid]["reason"]
    failed_corrupt = by_study[corrupt.identity.study_instance_uid]
    assert failed_corrupt["state"] == "failed" and failed_corrupt["failure_kind"] == "bad-input:undecodable-pixels"
    assert uid_digest(victim.SOPInstanceUID) in failed_corrupt["reason"]  # a short hash: reasons are shown in Explorer
    assert victim.SOPInstanceUID not in failed_corrupt["reason"]
    assert "modality CT is not MR" in by_study[wrong.identity.study_instance_uid]["reason"]
    failed_poison = by_study[poison.identity.study_instance_uid]
    assert failed_poison["state"] == "failed" and failed_poison["reason"], failed_poison
    for study in good:  # uploaded after the poisoned study: examined and done all the same
        assert by_study[study.identity.study_instance_uid]["state"] == "done"
    # Metrics count the failures by kind; the node is still ready.
    metrics = requests.get(node.url + "/metrics", headers=node.headers, timeout=10).text
    assert 'radfed_jobs_total{failure_kind="no-matching-series",state="failed"} 2.0' in metrics
    assert "radfed_stage_seconds_bucket" in metrics
    ready = node.ready()
    assert ready["ready"] is True and ready["problems"] == [], ready
    assert {name: loop["status"] for name, loop in ready["loops"].items()} == dict.fromkeys(
        ("examiner", "follower", "leases", "ledger-backup", "prefetch", "reconciler", "worker-0", "worker-1"), "ok"
    )
    assert (
        'radfed_loop_healthy{loop="examiner"} 1.0'
        in requests.get(node.url + "/metrics", headers=node.headers, timeout=10).text
    )


def test_late_instance_supersedes(
    orthanc: OrthancProcess, orthanc_client: OrthancClient, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(orthanc)
    node.start()
    study = _studies(1, seed=12)[0]
    t2 = study.series[Sequence.T2W]
    last = t2[-1]
    _upload([ds for ds in study_datasets(study) if ds is not last], orthanc_client)
    wait_until(_finished(node, 1), 120, "the first job", node.log_tail)
    first = node.jobs()[0]
    assert first["state"] == "done"
    orthanc_client.upload_dataset(last)  # a slice arriving late
    wait_until(lambda: len(node.jobs("done")) == 2, 120, "the superseding job", node.log_tail)
    newer = node.jobs()[0]
    assert newer["fingerprint"] != first["fingerprint"]
    assert newer["result"]["supersedes"] == first["result"]["sr_sop_instance_uid"]
    sr = pydicom.dcmread(
        io.BytesIO(
            orthanc_client.instance_bytes(orthanc_client.find_instance(newer["result"]["sr_sop_instance_uid"]) or "")
        )
    )
    referenced = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == first["result"]["sr_sop_instance_uid"]


def test_api_requires_the_token_and_manages_models(
    orthanc: OrthancProcess, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(orthanc)
    node.start()
    for path in ("/health", "/ready", "/jobs", "/models", "/metrics", "/openapi.json", "/docs"):
        assert requests.get(node.url + path, timeout=5).status_code == 401
        assert requests.get(node.url + path, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    assert node.get("/models") == [{"name": "prostate-mpmri", "version": "0.0.1", "active": True}]
    active = node.get("/models/active")
    assert active["provider"] == "CPUExecutionProvider" and len(active["sha256"]) == 64
    assert node.post("/models/prostate-mpmri/0.0.1/activate") == {"active": "prostate-mpmri:0.0.1"}
    response = requests.post(node.url + "/models/prostate-mpmri/9.9.9/activate", headers=node.headers, timeout=5)
    assert response.status_code == 400 and "not installed" in response.json()["detail"]
    assert "/jobs/{job_id}/retry" in node.get("/openapi.json")["paths"]
    # Bad arguments are refused at the edge (422), never a server error or Orthanc's own text.
    bad = [
        ("post", "/orthanc/stable-study", {"orthanc_study_id": ""}),
        ("post", "/orthanc/stable-study", {"orthanc_study_id": "../../system"}),
        ("post", "/studies/1.2.*/run", None),
        ("post", "/studies/" + "1." * 40 + "1/run", None),
        ("get", f"/jobs/{2**63}", None),
        ("post", f"/jobs/{2**64}/retry", None),
        ("post", "/models/..%2F..%2Fetc/1/activate", None),
        ("post", "/models/prostate-mpmri/" + "9" * 300 + "/activate", None),
    ]
    for method, path, body in bad:
        answer = requests.request(method, node.url + path, headers=node.headers, json=body, timeout=5)
        assert answer.status_code in (404, 422), (path, answer.status_code, answer.text)
        assert str(node.workdir) not in answer.text
    assert node.ready()["inbox"] == 0  # nothing malformed reached the examiner
    assert TOKEN not in node.log_tail(200)


PLUGIN_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "orthanc" / "radfed_orthanc_plugin.py"


def test_orthanc_plugin_pushes_and_shows_status(
    orthanc_factory: Callable[..., OrthancProcess], node_factory: Callable[..., NodeProcess]
) -> None:
    from radfed.inference.testing.orthanc_server import free_port

    api_port = free_port()
    orthanc = orthanc_factory(
        "with-plugin",
        python_script=PLUGIN_SCRIPT,
        extra={"Radfed": {"Url": f"http://127.0.0.1:{api_port}", "Token": TOKEN}},
    )
    # A node that polls /changes only every 60 s: a prompt job proves the push arrived.
    node = node_factory(orthanc, port=api_port, poll_interval_s=60.0)
    node.start()
    study = _studies(1, seed=13)[0]
    with OrthancClient(orthanc.endpoint) as client:
        upload_study(study, client)
        wait_until(_finished(node, 1), 90, "a job started by the plugin's push", node.log_tail)
        study_id = client.find_study(study.identity.study_instance_uid)
        status = client.get_json(f"/radfed/study-status/{study_id}")
    assert status["jobs"][0]["state"] == "done"
    # Orthanc Explorer 2's study button, as the shipped configuration defines it, resolved the way the browser does
    # from OE2's app page (<Root>app/, Root /ui/ by default): it must reach the plugin's page for this study.
    button = _oe2_study_button()
    page_url = urllib.parse.urljoin(f"{orthanc.endpoint.url}/ui/app/", button["Url"].replace("{UUID}", study_id))
    auth = (orthanc.endpoint.username, orthanc.endpoint.password) if orthanc.endpoint.username else None
    page = requests.get(page_url, auth=auth, timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    job = status["jobs"][0]
    assert f"{job['model']}: done - {job['result']['lesions']} lesion(s)" in page.text
    assert "research use only" in page.text.lower()
    assert study.identity.patient_id not in page.text  # the page names no patient
    # An unknown study is a readable line on the page, not a plugin traceback.
    missing = requests.get(urllib.parse.urljoin(f"{orthanc.endpoint.url}/ui/app/", "../../radfed/study-page/nope"),
                           auth=auth, timeout=10)  # fmt: skip
    assert missing.status_code == 200 and "no such study in this Orthanc" in missing.text
    assert "Traceback" not in orthanc.log_tail(400)


def _oe2_study_button() -> dict[str, str]:
    config = json.loads((PLUGIN_SCRIPT.parent / "orthanc-explorer-2-radfed.json").read_text())
    buttons = config["OrthancExplorer2"]["UiOptions"]["CustomButtons"]["study"]
    (button,) = [b for b in buttons if b["Id"] == "radfed-study-status"]
    assert button["HttpMethod"] == "GET" and "{UUID}" in button["Url"]
    return button


def test_orthanc_plugin_stays_thin() -> None:
    source = PLUGIN_SCRIPT.read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"html", "json", "os", "threading", "urllib", "orthanc"}, imports
