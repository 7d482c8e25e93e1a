"""``radfed init --orthanc URL`` writes a node configuration that ``radfed serve`` starts from against a real
Orthanc, a token only its owner can read, and the Orthanc keys to add; it never overwrites unasked."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from radfed.inference.testing.orthanc_server import OrthancProcess, free_port
from radfed.plugin.commands.init import InitError, node_file_text
from tests.plugin.node_harness import wait_until

pytestmark = pytest.mark.orthanc


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_radfed_serve_starts_from_what_radfed_init_wrote(
    tmp_path: Path, orthanc_factory: Callable[..., OrthancProcess]
) -> None:
    orthanc = orthanc_factory("pacs")
    config, env_file = tmp_path / "etc" / "radfed-node.toml", tmp_path / "etc" / "radfed.env"
    url = f"http://{orthanc.options.username}@127.0.0.1:{orthanc.http_port}"
    command = [sys.executable, "-m", "radfed.plugin", "init", "--orthanc", url, "--config", str(config)]
    command += ["--state-dir", str(tmp_path / "state")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"PythonScript"' in done.stdout and "radfed_orthanc_plugin.py" in done.stdout
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    secrets_written = _env_file(env_file)
    token = secrets_written["RADFED_API_TOKEN"]
    assert len(token) >= 32 and token not in config.read_text()  # the secret stays out of the TOML file

    env = dict(os.environ, **secrets_written)
    env["RADFED_ORTHANC_PASSWORD"] = orthanc.options.password  # step 1 of what init printed
    port = free_port()
    env["RADFED_API_PORT"] = str(port)  # 8700 may be taken on a test machine
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        node = subprocess.Popen(
            [sys.executable, "-m", "radfed.plugin", "serve", "--config", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        headers = {"Authorization": f"Bearer {token}"}

        def healthy() -> bool:
            assert node.poll() is None, log.read_text()
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", headers=headers, timeout=1).ok
            except requests.RequestException:
                return False

        wait_until(healthy, 60, "radfed serve started from radfed init's files", log.read_text)

        def readiness() -> dict[str, object]:
            response = requests.get(f"http://127.0.0.1:{port}/ready", headers=headers, timeout=5)
            answer: dict[str, object] = response.json()
            return answer

        # nothing is wrong with the written configuration but the model not installed yet (loops start first)
        wait_until(lambda: readiness()["problems"] == ["no active model"], 60, "only 'no active model'", log.read_text)
        ready = readiness()
        assert ready["orthanc_reachable"] is True and ready["ledger"] == "ok", ready  # the user and password work
        assert (tmp_path / "state" / "ledger.sqlite").exists()
    finally:
        node.terminate()
        node.wait(timeout=30)

    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr  # never overwrites unasked
    assert _env_file(env_file)["RADFED_API_TOKEN"] == token


def test_a_url_with_a_password_or_no_host_is_refused() -> None:
    template = '[orthanc]\nurl = "x"\nusername = "y"\n[node]\nstate_dir = "/z"\n'
    with pytest.raises(InitError, match="must not carry a password"):
        node_file_text(template, "http://radfed:secret@pacs:8042", Path("/s"))
    with pytest.raises(InitError, match="http"):
        node_file_text(template, "pacs:8042", Path("/s"))
    text = node_file_text(template, "https://node@pacs.example.org:8043/orthanc/", Path("/s"))
    assert 'url = "https://pacs.example.org:8043/orthanc"' in text and 'username = "node"' in text
