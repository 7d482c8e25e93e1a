"""The federation as sites deploy it: TLS with a private CA and SuperNode authentication, credentials made
by deploy/flower/make-credentials.sh. A registered hospital joins and trains; an unregistered one is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from radfed.inference.artifact import load_artifact
from radfed.inference.orthanc.launcher import free_port
from radfed.inference.synthetic.writer import synthesize_to_folder
from tests.federation.flower_harness import BIN, ProcessGroup, flower_env, wait_for_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "flower"


def test_tls_and_node_authentication(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    made = subprocess.run(
        ["bash", str(DEPLOY / "make-credentials.sh"), str(credentials), "127.0.0.1", "site-1", "site-2"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    home = tmp_path / "flwr-home"
    env = flower_env(home)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "secure"\n\n[superlink.secure]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{credentials / "ca.crt"}"\n'
    )
    data = tmp_path / "data"
    synthesize_to_folder(data, sites=2, studies_per_site=2, seed=7, small=True)
    group = ProcessGroup(tmp_path / "logs", env)
    spawn = group.spawn
    try:
        spawn(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--ssl-ca-certfile",
                str(credentials / "ca.crt"),
                "--ssl-certfile",
                str(credentials / "server.pem"),
                "--ssl-keyfile",
                str(credentials / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(port)
        registered = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(credentials / "site-1.pub"), "secure"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr
        for site in (1, 2):  # site-2's key was never registered
            spawn(
                f"supernode-{site}",
                [
                    str(BIN / "flower-supernode"),
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--root-certificates",
                    str(credentials / "ca.crt"),
                    "--auth-supernode-private-key",
                    str(credentials / f"site-{site}"),
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"data='{data / f'site-{site}'}' state-dir='{tmp_path / f's{site}'}'",
                ],
            )
        time.sleep(8)
        listed = subprocess.run(
            [str(BIN / "flwr"), "supernode", "list", "secure", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        nodes = json.loads(listed.stdout)
        online = [n for n in nodes.get("nodes", []) if str(n.get("status", "")).lower() == "online"]
        assert len(online) == 1, nodes  # only the registered hospital is connected
        app, out = tmp_path / "app", tmp_path / "job"
        shutil.copytree(DEPLOY, app, ignore=shutil.ignore_patterns("*.sh"))
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(app),
                "secure",
                "--stream",
                "--run-config",
                f"out-dir='{out}' num-server-rounds=1 local-steps=2 min-sites=1 epsilon=0.0",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert len(line["sites"]) == 1 and line["flagged"] == []
        assert load_artifact(out / "artifact").provenance["training"] == "federated"
    finally:
        group.stop()
