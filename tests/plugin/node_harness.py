"""A real radfed node (``radfed serve`` in its own process) beside a real Orthanc, for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from radfed.inference.testing.orthanc_server import OrthancProcess, free_port

TOKEN = "test-token-not-secret"


class NodeProcess:
    def __init__(
        self,
        workdir: Path,
        orthanc: OrthancProcess,
        artifact: Path | None,
        *,
        concurrency: int = 2,
        extra: str = "",
        port: int | None = None,
        poll_interval_s: float = 0.3,
        prefetch: bool = True,
        node_settings: str = "",
        role: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.orthanc = orthanc
        self.port = port or free_port()
        self.config = workdir / "node.toml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"""
[orthanc]
url = "{orthanc.url}"
username = "{orthanc.options.username}"

[node]
state_dir = "{workdir / "state"}"
concurrency = {concurrency}
poll_interval_s = {poll_interval_s}
prefetch = {str(prefetch).lower()}
retry_base_s = 1.0
retry_max_s = 4.0
{node_settings}

[api]
port = {self.port}

{extra}
"""
        )
        self.env = dict(
            os.environ,
            RADFED_ORTHANC_PASSWORD=orthanc.options.password,
            RADFED_API_TOKEN=TOKEN,
            ORT_DISABLE_TELEMETRY="1",
        )
        self.artifact = artifact
        self.role = role  # radfed serve --role
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "node.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0, activate: str = "prostate-mpmri:0.0.1") -> None:
        args = [sys.executable, "-m", "radfed.plugin", "serve", "--config", str(self.config)]
        if self.artifact is not None:
            args += ["--install-model", str(self.artifact), "--activate", activate]
        if self.role is not None:
            args += ["--role", self.role]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until(lambda: self._answers(), timeout_s, f"node API on {self.url}", self.log_tail)

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"radfed serve exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            return requests.get(self.url + "/health", headers=self.headers, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def get(self, path: str, **params: Any) -> Any:
        response = requests.get(self.url + path, headers=self.headers, params=params, timeout=10)
        response.raise_for_status()
        return response.json()

    def get_text(self, path: str) -> str:
        response = requests.get(self.url + path, headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.text

    def ready(self) -> dict[str, Any]:
        """/ready answers 503 with the same body while not ready."""
        response = requests.get(self.url + "/ready", headers=self.headers, timeout=10)
        assert response.status_code in (200, 503), response.text
        body: dict[str, Any] = response.json()
        assert (response.status_code == 200) == body["ready"]
        return body

    def post(self, path: str, json: Any = None) -> Any:
        response = requests.post(self.url + path, headers=self.headers, json=json, timeout=10)
        response.raise_for_status()
        return response.json()

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        params = {"limit": 1000}
        if state:
            params["state"] = state  # type: ignore[assignment]
        return self.get("/jobs", **params)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no chance to clean up
        self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, diagnostics: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{diagnostics()}")
