"""The viewer server on its own: OHIF's files, radfed's configuration, client-side routes, and the
same-origin proxy to a real Orthanc (credentials added by the proxy, never sent by the browser)."""

from __future__ import annotations

import re
from pathlib import Path

import requests

from radfed.inference.orthanc.launcher import OrthancProcess
from radfed.plugin.viewer import OrthancTarget, app_config_js, default_dist, serving

ROOT = Path(__file__).resolve().parents[2]
KEYS = (
    "disableConfirmationPrompts: true",
    "measurementTrackingMode: 'simplified'",
    "omitQuotationForMultipartRequest: true",
    "imageRendering: 'wadors'",
    "qidoSupportsIncludeField: false",
)


def test_routes_config_and_proxy(orthanc: OrthancProcess) -> None:
    target = OrthancTarget(orthanc.url, orthanc.options.username, orthanc.options.password)
    with serving(default_dist(ROOT), target) as viewer:
        index = requests.get(viewer.url + "/", timeout=10)
        assert index.status_code == 200 and "<html" in index.text.lower()
        route = requests.get(viewer.study_url("1.2.3"), timeout=10)  # a client-side route: index.html
        assert route.text == index.text
        config = requests.get(viewer.url + "/app-config.js", timeout=10)
        assert config.headers["Content-Type"] == "application/javascript"
        assert all(key in config.text for key in KEYS)
        wasm = next(p.name for p in default_dist(ROOT).glob("*.wasm"))
        assert requests.get(f"{viewer.url}/{wasm}", timeout=10).headers["Content-Type"] == "application/wasm"
        studies = requests.get(viewer.url + "/dicom-web/studies", timeout=10)  # no credentials from us
        assert studies.status_code in (200, 204), studies.text[:300]
        escape = requests.get(viewer.url + "/../../../../etc/passwd", timeout=10)
        assert "root:" not in escape.text


def test_the_admins_config_has_what_radfed_needs() -> None:
    shipped = (ROOT / "deploy" / "ohif" / "app-config.js").read_text()
    for key in KEYS:
        assert re.sub(r"\s+", " ", key) in re.sub(r"\s+", " ", shipped), key
    assert all(key in app_config_js() for key in KEYS)
