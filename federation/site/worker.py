"""The site worker: one long-lived process per SuperNode that keeps torch, the cohort and the job's state warm.

Flower's SuperNode starts a fresh ClientApp process for every message; importing torch, opening the
cohort and building the first optimiser again each time cost seconds per round (see ../shared/SETUP.md).
The ClientApp therefore stays thin (flwr + numpy) and forwards each request to this worker over a local
socket. The worker is started on the first request, lives in the SuperNode's process group (stopping the
SuperNode stops it), exits as soon as that SuperNode is gone or after an idle period, and handles one
request at a time.

Wire format (no pickle): ``multiprocessing.connection`` with an HMAC handshake on a key only the site's
user can read, then one byte frame per request and per reply: a JSON header and the arrays as ``.npz``.
The socket is in Linux's abstract namespace, named from the state folder and the SuperNode's pid.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.common.constant import PARTITION_ID_KEY

from radfed.federation.job.alerts import AlertStore, PoisoningAlert
from radfed.federation.site.config import SiteConfig
from radfed.inference.errors import RadfedError

logger = logging.getLogger(__name__)

Arrays = list[npt.NDArray[Any]]
KEY_FILE = "site-worker.key"
LOG_FILE = "site-worker.log"
START_TIMEOUT_S = 120.0
IDLE_EXIT_S = 3600.0


class Request(StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    LANDMARKS = "landmarks"
    FINGERPRINT = "fingerprint"
    ROLLOUT = "rollout"


class SiteWorkerError(RadfedError, RuntimeError):
    """The site worker could not be reached or failed the request (the reason is the worker's)."""


@dataclass(frozen=True)
class Frame:
    header: dict[str, Any]
    arrays: Arrays


def pack(frame: Frame) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *frame.arrays)
    header = json.dumps(frame.header).encode()
    return len(header).to_bytes(8, "big") + header + buffer.getvalue()


def unpack(data: bytes) -> Frame:
    size = int.from_bytes(data[:8], "big")
    header = json.loads(data[8 : 8 + size])
    with np.load(io.BytesIO(data[8 + size :]), allow_pickle=False) as stored:
        arrays = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    return Frame(header, arrays)


def _address(state_dir: Path, parent_pid: int) -> str:
    digest = hashlib.sha256(f"{state_dir.resolve()}|{parent_pid}".encode()).hexdigest()[:24]
    return f"\0radfed-site-worker-{digest}"


def _authkey(state_dir: Path) -> bytes:
    """The worker's shared secret, created once per site (readable by the site's user only)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / KEY_FILE
    with contextlib.suppress(FileExistsError):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


# ---------------------------------------------------------------------------------------------- client side


def call_site_worker(node_config: Mapping[str, Any], request: Request, frame: Frame) -> Frame:
    """Send one request to this SuperNode's worker (starting it when none is running) and return its reply;
    a request the worker failed raises SiteWorkerError with the worker's reason."""
    site = SiteConfig.from_node_config(dict(node_config))
    # the ClientApp's parent: the SuperNode, or radfed's warm SuperExec that forks ClientApps for it; the worker
    # lives as long as that process
    parent = os.getppid()
    address, key = _address(site.state_dir, parent), _authkey(site.state_dir)
    connection = _connect(address, key) or _start_and_connect(site.state_dir, parent, address, key)
    with connection:
        connection.send_bytes(
            pack(Frame({"request": str(request), "node_config": dict(node_config), **frame.header}, frame.arrays))
        )
        try:
            reply = unpack(connection.recv_bytes())
        except EOFError as exc:
            raise SiteWorkerError(
                f"the site worker stopped during '{request}' (see {site.state_dir / LOG_FILE})"
            ) from exc
    if "error" in reply.header:
        raise SiteWorkerError(str(reply.header["error"]))
    return reply


def _connect(address: str, key: bytes) -> Connection | None:
    try:
        return Client(address, family="AF_UNIX", authkey=key)
    except (ConnectionRefusedError, FileNotFoundError):
        return None


def _start_and_connect(state_dir: Path, parent_pid: int, address: str, key: bytes) -> Connection:
    with (state_dir / "site-worker.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two messages at once start one worker
        connection = _connect(address, key)
        if connection is not None:
            return connection
        with (state_dir / LOG_FILE).open("a") as log:
            # stdio goes to the log: Flower waits for the ClientApp's pipes to close.
            process = subprocess.Popen(
                [sys.executable, "-m", "radfed.federation.site.worker", "--state-dir", str(state_dir),
                 "--parent-pid", str(parent_pid)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            connection = _connect(address, key)
            if connection is not None:
                return connection
            if process.poll() is not None:
                raise SiteWorkerError(f"the site worker exited with status {process.returncode}: {_tail(state_dir)}")
            time.sleep(0.05)
        process.kill()
        raise SiteWorkerError(f"the site worker did not start within {START_TIMEOUT_S:.0f} s: {_tail(state_dir)}")


def _tail(state_dir: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join((state_dir / LOG_FILE).read_text().splitlines()[-lines:])
    return "no log"


def simulated_node_config(node_config: Mapping[str, Any], round_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node config of a site under Flower's simulation runtime, which gives only ``partition-id`` (the
    message's round config carries the job's ``simulation-root``): site
    ``site-<partition + 1, 3 digits>`` with its data in ``<simulation-root>/sites/`` and its state (optimiser,
    accountant, reply cache) in ``<simulation-root>/state/``, so that DP accounting and replay stay per site
    whichever Ray actor serves it."""
    root = str(round_config.get("simulation-root", ""))
    if not root:
        raise ValueError("a simulated site needs run-config simulation-root (radfed federation simulate sets it)")
    name = simulated_site_name(int(node_config[PARTITION_ID_KEY]))
    data = Path(root) / "sites" / name
    labels = data / "labels.csv"
    return {
        "site-name": name,
        "data": str(data),
        "state-dir": str(Path(root) / "state" / name),
        **({"labels": str(labels)} if labels.is_file() else {}),
    }


def simulated_site_name(partition: int) -> str:
    return f"site-{partition + 1:03d}"


# ---------------------------------------------------------------------------------------------- worker side


def handle(frame: Frame) -> Frame:
    """Run one request with the site's own code (imported here: this is where torch lives)."""
    from radfed.federation.site import rounds as site_code

    request = Request(frame.header["request"])
    config = site_code.SiteConfig.from_node_config(frame.header["node_config"])
    if request is Request.ROLLOUT:
        files = {name: array.tobytes() for name, array in zip(frame.header["files"], frame.arrays, strict=True)}
        return Frame({"metrics": {"model_installed": 1}, "installed": site_code.install_rollout(config, files)}, [])
    plan = site_code.RoundPlan.from_config(frame.header["config"])
    keep_alerts(config, plan.alerts)
    if request is Request.TRAIN:
        arrays, metrics = site_code.train_round(config, plan, frame.arrays)
        return Frame({"metrics": metrics}, arrays)
    if request is Request.EVALUATE:
        return Frame({"metrics": site_code.evaluate_round(config, plan, frame.arrays)}, [])
    if request is Request.FINGERPRINT:
        return Frame({"metrics": site_code.site_fingerprint(config, plan)}, [])
    return Frame({"metrics": site_code.intensity_landmarks(config, plan)}, [])


def keep_alerts(site: SiteConfig, alerts: Sequence[PoisoningAlert]) -> None:
    """Store the job's poisoning alerts where the node beside this site shows them (its state folder, from
    node-config ``node-state-dir``; the site's own state folder when no node is named)."""
    if not alerts:
        return
    try:
        new = AlertStore(site.node_state_dir or site.state_dir).record(alerts)
    except OSError as exc:  # the round goes on; every later message of the job repeats the alerts
        logger.error("could not store %d poisoning alert(s): %s", len(alerts), exc)
        return
    for received in new:
        alert = received.alert
        logger.warning(
            "poisoning alert %s: job %s, round %d, site %s, rule %s",
            alert.alert_id, alert.job, alert.server_round, alert.site, alert.rule,
        )  # fmt: skip


def serve(state_dir: Path, parent_pid: int, idle_exit_s: float = IDLE_EXIT_S) -> None:
    address, key = _address(state_dir, parent_pid), _authkey(state_dir)
    last_active = [time.monotonic()]

    def watchdog() -> None:
        # The worker must not outlive its SuperNode (a stopped or killed site sends nothing more).
        while True:
            time.sleep(0.5)
            if not process_alive(parent_pid):
                logger.info("parent %d (SuperNode or warm SuperExec) is gone: exiting", parent_pid)
                os._exit(0)
            if time.monotonic() - last_active[0] > idle_exit_s:
                logger.info("idle for %.0f s: exiting", idle_exit_s)
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    with Listener(address, family="AF_UNIX", authkey=key) as listener:
        logger.info("site worker for parent %d ready", parent_pid)
        _warm_up()
        while True:
            try:
                connection = listener.accept()
            except Exception as exc:  # noqa: BLE001 - a bad handshake must not stop the worker
                logger.warning("refused a connection: %s", exc)
                continue
            with connection:
                _serve_one(connection)
            last_active[0] = time.monotonic()


def _serve_one(connection: Connection) -> None:
    started = time.perf_counter()
    request, received = "?", started
    try:
        frame = unpack(connection.recv_bytes())
        request, received = frame.header.get("request", "?"), time.perf_counter()
        reply = handle(frame)
    except Exception as exc:  # noqa: BLE001 - the reason goes back to the ClientApp and the coordinator
        logger.error("request failed: %s\n%s", exc, traceback.format_exc(limit=4))
        reply = Frame({"error": f"{type(exc).__name__}: {exc}"}, [])
    handled = time.perf_counter()
    reply.header["worker_pid"] = os.getpid()
    reply.header["worker_seconds"] = handled - started
    with contextlib.suppress(OSError, EOFError):
        connection.send_bytes(pack(reply))
    logger.info(
        "%s done in %.2f s (receive %.2f, work %.2f, reply %.2f)",
        request, time.perf_counter() - started, received - started, handled - received, time.perf_counter() - handled,
    )  # fmt: skip


def _warm_up() -> None:
    """Import torch and the site's code before the first request needs them."""
    from radfed.federation.site import rounds  # noqa: F401


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a killed SuperNode not yet reaped is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def main() -> None:
    parser = argparse.ArgumentParser(description="radfed site worker (started by the radfed ClientApp)")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, required=True, help="exit when this process is gone")
    parser.add_argument("--idle-exit", type=float, default=IDLE_EXIT_S)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s site-worker: %(message)s")
    serve(args.state_dir, args.parent_pid, args.idle_exit)


if __name__ == "__main__":
    main()
