"""Clinical work first on a real node (``radfed serve`` + Orthanc) beside a real training process (a site's
federated round, ``bench.site_training``) sharing the node's state folder: a clinical job runs while a training
step is in flight (even one that never ends), and the training process killed with SIGKILL inside a step, while
it holds the device, leaves no lock behind: the next clinical job runs, and a new training process steps."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.site_training import read_steps
from radfed.inference.model.arbiter import STEP_LOCK, DeviceArbiter
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancProcess
from radfed.inference.testing.synthetic.sites import site_profile
from radfed.inference.testing.synthetic.study import render_study
from radfed.inference.testing.synthetic.writer import upload_study
from tests.plugin.node_harness import NodeProcess, wait_until

REPO = Path(__file__).resolve().parents[2]


def _step_in_flight(state_dir: Path) -> bool:
    """True while a training step holds the step lock (a shared probe cannot get it)."""
    fd = os.open(state_dir / STEP_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got it
    return False


def _stopped(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state == "T"


def _freeze_inside_a_step(trainer: subprocess.Popen[bytes], state_dir: Path, log: Path) -> None:
    """SIGSTOP the trainer at a moment it is inside a training step, so the kill lands there for certain."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert trainer.poll() is None, log.read_text(errors="replace")[-3000:]
        if _step_in_flight(state_dir):
            trainer.send_signal(signal.SIGSTOP)
            wait_until(lambda: _stopped(trainer.pid), 10, "the trainer to stop")
            if _step_in_flight(state_dir):
                return
            trainer.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError("the trainer was never caught inside a step")


@pytest.fixture
def trainer_factory(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / "training.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.site_training", *args],
            cwd=REPO,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _job(node: NodeProcess, study_instance_uid: str) -> dict[str, Any] | None:
    return next((j for j in node.jobs() if j["study_instance_uid"] == study_instance_uid), None)


def _wait_for(node: NodeProcess, study_instance_uid: str, state: str, what: str) -> dict[str, Any]:
    wait_until(
        lambda: (_job(node, study_instance_uid) or {}).get("state") == state,
        180,
        what,
        lambda: f"{node.jobs()}\n{node.log_tail()}",
    )
    job = _job(node, study_instance_uid)
    assert job is not None
    return job


def test_a_training_process_killed_inside_a_step_leaves_the_node_running_its_clinical_jobs(
    tmp_path: Path,
    orthanc_factory: Callable[..., OrthancProcess],
    node_factory: Callable[..., NodeProcess],
    trainer_factory: Callable[..., subprocess.Popen[bytes]],
    synth_root: Path,
) -> None:
    orthanc = orthanc_factory()
    node = node_factory(orthanc, node_settings='device_policy = "clinical-first"')
    node.start(timeout_s=180)  # a loaded 2-core machine took over 60 s to start it
    state_dir = node.workdir / "state"
    record = tmp_path / "steps.jsonl"
    trainer = trainer_factory(
        f"--data={synth_root / 'site-1'}",
        f"--state-dir={tmp_path / 'site'}",
        f"--node-state-dir={state_dir}",
        "--policy=clinical-first",
        f"--record={record}",
        "--local-steps=100000",
        "--rounds=1",
        "--epsilon=0",
    )
    log = tmp_path / "training.log"
    wait_until(lambda: len(read_steps(record)) >= 2, 600, "two training steps", lambda: log.read_text()[-3000:])
    _freeze_inside_a_step(trainer, state_dir, log)

    site = site_profile(2, small=True)
    first, second = (render_study(site, number, seed=11) for number in (1, 2))
    with OrthancClient(orthanc.endpoint) as client:
        upload_study(first, client)
        job = _wait_for(node, first.identity.study_instance_uid, "done", "a job beside the frozen step")
        assert job["timings_s"]["device_wait"] < 1.0  # it did not wait for the step in flight
        assert _step_in_flight(state_dir) and _stopped(trainer.pid)  # which is still there

        trainer.send_signal(signal.SIGKILL)  # inside the step, holding the device
        assert trainer.wait(timeout=30) == -signal.SIGKILL

        upload_study(second, client)
        uid = second.identity.study_instance_uid
        job = _wait_for(node, uid, "done", "the next job")
        assert job["timings_s"]["device_wait"] < 1.0  # nothing held the device any more
    assert not _step_in_flight(state_dir)
    assert _steps_at_once(state_dir)  # as a new training process would


def _steps_at_once(state_dir: Path) -> bool:
    """A training step gets the device within 5 s (in a thread: a step lowers its thread's priority for good)."""
    stepped = threading.Event()

    def step() -> None:
        with DeviceArbiter(state_dir).training_step():
            stepped.set()

    threading.Thread(target=step, daemon=True).start()
    return stepped.wait(5.0)
