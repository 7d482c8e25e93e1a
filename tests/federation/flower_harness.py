"""Real Flower processes (SuperLink, SuperNodes) for the federation tests: environment, start, stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def flower_env(home: Path) -> dict[str, str]:
    """An environment with its own FLWR_HOME and no telemetry or update checks."""
    home.mkdir(parents=True, exist_ok=True)
    return dict(
        os.environ,
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        ORT_DISABLE_TELEMETRY="1",
    )


def wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


class ProcessGroup:
    """Processes started for one test, each logging to ``logs/<name>.log``; all stopped together."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.processes: list[subprocess.Popen[bytes]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, args: list[str]) -> None:
        with (self.logs / f"{name}.log").open("wb") as log:
            self.processes.append(
                subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
