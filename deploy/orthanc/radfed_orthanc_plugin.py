"""radfed's thin Orthanc Python plugin (runs inside Orthanc's embedded Python).

It only (1) pushes a notification to the radfed node when a study becomes stable, so results start
without waiting for the node's next /changes poll, and (2) shows the radfed job status of a study, with the
federation's open poisoning alerts (a hospital's update flagged in a job this site takes part in): in the legacy
Orthanc Explorer's study page, and as a page (``/radfed/study-page/<id>``) that Orthanc Explorer 2 opens from a
study button (``orthanc-explorer-2-radfed.json`` beside this script). Heavy work never runs here: no torch, opacus,
flwr, numpy, not even radfed itself (Orthanc's GIL and deadlock history). The node also follows /changes, so a
lost push loses nothing.

Orthanc configuration (the PACS admin adds it next to "PythonScript"):

    "Radfed": {"Url": "http://127.0.0.1:8700", "Token": "<the node's API token>"}

(RADFED_NODE_URL and RADFED_API_TOKEN in Orthanc's environment override it.)
"""

import html
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request

import orthanc

_settings = json.loads(orthanc.GetConfiguration()).get("Radfed", {})
NODE_URL = os.environ.get("RADFED_NODE_URL", _settings.get("Url", "http://127.0.0.1:8700")).rstrip("/")
TOKEN = os.environ.get("RADFED_API_TOKEN", _settings.get("Token", ""))
TIMEOUT_S = 5
# what orthanc.RestApiGet raises for an unknown resource (OrthancException in current orthanc-python)
_ORTHANC_ERRORS = (getattr(orthanc, "OrthancException", ValueError), ValueError)


def _node_request(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(NODE_URL + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + TOKEN)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return json.loads(response.read().decode())


def _notify(study_id):
    try:
        _node_request("POST", "/orthanc/stable-study", {"orthanc_study_id": study_id})
    except (urllib.error.URLError, OSError, ValueError) as exc:
        # The node's /changes follower will still see the study; say so without any patient data.
        orthanc.LogWarning(f"radfed: could not notify the node about study {study_id} ({exc})")


def on_change(change_type, level, resource_id):
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        # Never block Orthanc's change thread on the network.
        threading.Thread(target=_notify, args=(resource_id,), daemon=True).start()


def _status(study_id):
    """The node's jobs for one Orthanc study (newest first) and its open alerts, or an error in words."""
    try:
        study = json.loads(orthanc.RestApiGet("/studies/" + study_id))
    except _ORTHANC_ERRORS:
        return {"error": "no such study in this Orthanc"}
    try:
        uid = study["MainDicomTags"]["StudyInstanceUID"]
        jobs = _node_request("GET", "/jobs?" + urllib.parse.urlencode({"study_instance_uid": uid, "limit": 20}))
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        return {"error": f"radfed node unreachable: {exc}"}
    answer = [{"state": j["state"], "model": j["model"], "reason": j["reason"], "result": j["result"]} for j in jobs]
    return {"jobs": answer, "alerts": _open_alerts()}


def study_status(output, uri, **request):
    """GET /radfed/study-status/<orthanc study id> -> the node's jobs for that study (JSON)."""
    output.AnswerBuffer(json.dumps(_status(request["groups"][0])), "application/json")


def _job_line(job):
    line = f"{job['model']}: {job['state']}"
    result = job.get("result") or {}
    if job["state"] == "done" and "lesions" in result:
        line += f" - {result['lesions']} lesion(s), {result.get('category', '')}"
    if job["state"] == "failed":
        line += f" - {job['reason']}"
    return line


def study_page(output, uri, **request):
    """GET /radfed/study-page/<orthanc study id> -> the same as a small HTML page, for Orthanc Explorer 2's study
    button (OE2 has no hook for a status box; its CustomButtons open a URL with the study's {UUID})."""
    status = _status(request["groups"][0])
    if "error" in status:
        items = [f"<li>{html.escape(status['error'])}</li>"]
    elif not status["jobs"]:
        items = ["<li>no AI job for this study</li>"]
    else:
        items = [f"<li>{html.escape(_job_line(job))}</li>" for job in status["jobs"]]
    alerts = [
        f"<li>job {html.escape(str(a['job']))}, round {html.escape(str(a['round']))}: the update of "
        f"{html.escape(str(a['site']))} was flagged ({html.escape(str(a['rule']))}) and left out; review before "
        "installing its model</li>"
        for a in status.get("alerts", [])
    ]
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>radfed AI status</title></head><body>'
        "<h1>radfed AI results for this study</h1><p><strong>For research use only.</strong> Results are stored in "
        "the study as a DICOM SEG and SR (series descriptions: AI &lt;model&gt; v&lt;version&gt; SEG / SR - "
        "RESEARCH USE ONLY).</p>"
        f'<h2>Jobs (newest first)</h2><ul id="radfed-jobs">{"".join(items)}</ul>'
        + (f'<h2>Federation alerts</h2><ul id="radfed-alerts">{"".join(alerts)}</ul>' if alerts else "")
        + "</body></html>"
    )
    output.AnswerBuffer(page, "text/html; charset=utf-8")


def _open_alerts():
    """The node's unresolved poisoning alerts (an unreachable or older node: none, the job status still shows)."""
    try:
        alerts = _node_request("GET", "/federation/alerts?resolved=false")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        orthanc.LogWarning(f"radfed: could not read the node's federation alerts ({exc})")
        return []
    return [{k: a[k] for k in ("job", "round", "site", "rule")} for a in alerts]


_EXPLORER_JS = """
function radfedStatus(studyId) {
  $('#radfed-status').remove();
  var box = $('<li id="radfed-status" data-role="list-divider">radfed: ...</li>');
  $('#study-info').append(box);
  $.ajax({url: '../radfed/study-status/' + studyId, dataType: 'json', success: function(s) {
    if (s.error) { box.text('radfed: ' + s.error); return; }
    var text = 'radfed: no AI job for this study';
    if (s.jobs.length) {
      var j = s.jobs[0];
      text = 'radfed AI (' + j.model + '): ' + j.state;
      if (j.state === 'done') {
        text += ' - ' + j.result.lesions + ' lesion(s), ' + j.result.category + ' (research use only)';
      }
      if (j.state === 'failed') { text += ' - ' + j.reason; }
    }
    box.text(text);
    $.each(s.alerts || [], function(i, a) {
      var line = $('<div class="radfed-alert" style="color:#b00"></div>');
      line.text('Federation alert: job ' + a.job + ', round ' + a.round + ': the update of ' + a.site +
                ' was flagged (' + a.rule + ') and left out; review before installing its model');
      box.append(line);
    });
  }});
}
// Filled each time the study page is shown within Orthanc Explorer (a page opened by a direct link to a study
// is shown before this script loads, and stays without the box).
$('#study').live('pagebeforeshow', function() { radfedStatus($.mobile.pageData.uuid); });
"""

orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/radfed/study-status/(.*)", study_status)
orthanc.RegisterRestCallback("/radfed/study-page/(.*)", study_page)
orthanc.ExtendOrthancExplorer(_EXPLORER_JS)
