"""radfed's warm SuperExec goes down with its SuperNode, with the SuperNode's exit status (the full path,
tasks forked into Flower's run_clientapp, runs in test_federation_local / test_flower_job and the demo)."""

from __future__ import annotations

import subprocess
import sys

from radfed.inference.testing.orthanc_server import free_port


def test_the_superexec_exits_with_its_supernode() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens: the SuperNode "dies" before serving
    started = subprocess.run(
        [sys.executable, "-m", "radfed.federation.site.superexec", "--runtime-api-address", address, "--",
         "sh", "-c", "sleep 1; exit 3"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert started.returncode == 3, started.stderr[-2000:]
    assert "is gone: exiting with 3" in started.stderr


def test_it_needs_a_supernode_to_follow() -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "radfed.federation.site.superexec", "--runtime-api-address", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "--supernode-pid" in refused.stderr
