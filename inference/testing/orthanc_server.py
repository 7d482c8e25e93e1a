"""Start and stop real Orthanc servers (Debian package) on free loopback ports.

Used by the tests, the demo and the local multi-site federation launcher. Each instance gets its own
storage, index, credentials and ports; it is ready when ``/system`` answers, and it is stopped by PID.
Orthanc 1.10 binds every interface (there is no bind-address option), so ``RemoteAccessAllowed`` is
off and callers run inside a private network namespace where that matters.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from radfed.inference.errors import OrthancLaunchError
from radfed.inference.orthanc.client import OrthancEndpoint

logger = logging.getLogger(__name__)

ORTHANC_BINARY = os.environ.get("RADFED_ORTHANC_BINARY", "/usr/sbin/Orthanc")
PLUGIN_DIR = Path(os.environ.get("RADFED_ORTHANC_PLUGINS", "/usr/share/orthanc/plugins"))


_GIVEN_PORTS: set[int] = set()
_GIVEN_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, and never one this process was given before: servers started side by
    side (threads) each get their own even before the first has bound its port."""
    with _GIVEN_LOCK:
        if len(_GIVEN_PORTS) > 16384:  # a long-lived process: start afresh (ports given long ago are bound or gone)
            _GIVEN_PORTS.clear()
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _GIVEN_PORTS:
                _GIVEN_PORTS.add(port)
                return port


@dataclass(frozen=True)
class OrthancOptions:
    """What a launched Orthanc looks like; defaults suit tests."""

    name: str = "radfed"
    aet: str = "ORTHANC"
    username: str = "radfed"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    stable_age_s: int = 2
    dicomweb: bool = True
    python_script: Path | None = None
    dicom_modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    # more plugin libraries from PLUGIN_DIR (e.g. libOrthancPostgreSQLIndex.so), configured through ``extra``
    plugins: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class OrthancProcess:
    """A running Orthanc started by :func:`start_orthanc`."""

    options: OrthancOptions
    http_port: int
    dicom_port: int
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def endpoint(self) -> OrthancEndpoint:
        return OrthancEndpoint(self.url, self.options.username, self.options.password)

    @property
    def log_path(self) -> Path:
        return self.workdir / "logs"

    def log_tail(self, lines: int = 30) -> str:
        logs = sorted(self.log_path.glob("*.log*"))
        if not logs:
            return "(no log)"
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop by PID (SIGTERM, then SIGKILL). Orthanc winds its HTTP, DICOM and jobs threads down one after
        another: about 3 s here; :func:`stop_orthancs` stops several at once."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        self.wait_stopped(timeout_s)

    def wait_stopped(self, timeout_s: float = 10.0) -> None:
        """Wait for a stop already asked for; SIGKILL after ``timeout_s``."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL (to simulate a crash or an outage)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self, timeout_s: float = 30.0) -> None:
        """Start again with the same storage, ports and credentials."""
        self.stop()
        self.process = _spawn(self.workdir)
        _wait_ready(self, timeout_s)


def orthanc_config(options: OrthancOptions, workdir: Path, http_port: int, dicom_port: int) -> dict[str, Any]:
    """The Orthanc JSON configuration for one instance."""
    plugins = []
    if options.dicomweb:
        plugins.append(str(PLUGIN_DIR / "libOrthancDicomWeb.so"))
    if options.python_script is not None:
        plugins.append(str(PLUGIN_DIR / "libOrthancPython.so"))
    plugins += [str(PLUGIN_DIR / name) for name in options.plugins]
    config: dict[str, Any] = {
        "Name": options.name,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": options.aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {options.username: options.password},
        "StableAge": options.stable_age_s,
        "HttpTimeout": 60,
        "DicomModalities": {k: list(v) for k, v in options.dicom_modalities.items()},
        "Plugins": plugins,
        "DicomWeb": {"Enable": options.dicomweb, "Root": "/dicom-web/"},
        "OverwriteInstances": True,
    }
    if options.python_script is not None:
        config["PythonScript"] = str(options.python_script)
        config["PythonVerbose"] = False
    config.update(options.extra)
    return config


def _spawn(workdir: Path) -> subprocess.Popen[bytes]:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [ORTHANC_BINARY, f"--logdir={workdir / 'logs'}", str(workdir / "orthanc.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_ready(instance: OrthancProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    auth = (instance.options.username, instance.options.password)
    while time.monotonic() < deadline:
        if not instance.alive():
            raise OrthancLaunchError(
                f"Orthanc {instance.options.name!r} exited with code {instance.process.returncode} "
                f"during start-up; last log lines:\n{instance.log_tail()}"
            )
        try:
            if requests.get(instance.url + "/system", auth=auth, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    instance.kill()
    raise OrthancLaunchError(
        f"Orthanc {instance.options.name!r} did not answer /system within {timeout_s:.0f} s; "
        f"last log lines:\n{instance.log_tail()}"
    )


def start_orthanc(workdir: Path, options: OrthancOptions | None = None, timeout_s: float = 30.0) -> OrthancProcess:
    """Start one Orthanc in ``workdir`` on free loopback ports and wait until it answers."""
    options = options or OrthancOptions()
    if shutil.which(ORTHANC_BINARY) is None and not Path(ORTHANC_BINARY).exists():
        raise OrthancLaunchError(
            f"{ORTHANC_BINARY} not found: install the Debian packages orthanc, orthanc-python and "
            "orthanc-dicomweb (make install does)"
        )
    # Orthanc logs "Inexistent path to plugins" and runs without the plugin: refuse here instead
    missing = [name for name in options.plugins if not (PLUGIN_DIR / name).exists()]
    if missing:
        raise OrthancLaunchError(f"Orthanc plugin(s) {', '.join(missing)} not found in {PLUGIN_DIR}")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = orthanc_config(options, workdir, http_port, dicom_port)
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
    instance = OrthancProcess(options, http_port, dicom_port, workdir, _spawn(workdir))
    _wait_ready(instance, timeout_s)
    logger.info("Orthanc %s ready on %s (DICOM port %d)", options.name, instance.url, dicom_port)
    return instance


def stop_orthancs(instances: Sequence[OrthancProcess], timeout_s: float = 10.0) -> None:
    """Stop several Orthancs gracefully, side by side: SIGTERM to all, then wait for each."""
    running = [instance for instance in instances if instance.alive()]
    for instance in running:
        instance.process.send_signal(signal.SIGTERM)
    for instance in running:
        instance.wait_stopped(timeout_s)


def start_orthanc_sites(root: Path, names: Sequence[str], **option_overrides: Any) -> list[OrthancProcess]:
    """One Orthanc per simulated hospital, under ``root/<name>``; all or none are left running."""
    started: list[OrthancProcess] = []
    try:
        for name in names:
            aet = name.upper().replace("-", "")[:16]
            started.append(start_orthanc(root / name, OrthancOptions(name=name, aet=aet, **option_overrides)))
    except BaseException:
        stop_orthancs(started)
        raise
    return started
