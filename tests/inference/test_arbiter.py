"""Clinical work first on a shared device: training pauses at its next step boundary while a clinical job
runs, a clinical job does not wait for the step in flight, training steps run in a thread of lower priority,
and a killed process leaves no stuck lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from radfed.inference.model.arbiter import TRAINING_NICE, DeviceArbiter, DevicePolicy

STEP_S = 0.05


def _train(folder: Path, policy: DevicePolicy, stop: threading.Event, starts: list[float], paused: list[float]) -> None:
    arbiter = DeviceArbiter(folder, policy)  # the site worker's own handle, as in its own process
    while not stop.is_set():
        with arbiter.training_step() as waited:
            starts.append(time.monotonic())
            time.sleep(STEP_S)  # one step's work
        paused.extend(waited)


def _run(folder: Path, policy: DevicePolicy) -> tuple[list[float], list[float], list[float], float, float]:
    stop = threading.Event()
    starts: list[float] = []
    paused: list[float] = []
    trainer = threading.Thread(target=_train, args=(folder, policy, stop, starts, paused))
    trainer.start()
    time.sleep(0.3)
    node = DeviceArbiter(folder, policy)
    with node.clinical() as waited:
        entered = time.monotonic()
        time.sleep(1.0)  # the clinical job runs
        left = time.monotonic()
    time.sleep(0.3)
    stop.set()
    trainer.join()
    return starts, paused, waited, entered, left


def test_training_pauses_while_clinical_work_runs_and_resumes_after(tmp_path: Path) -> None:
    starts, paused, waited, entered, left = _run(tmp_path, DevicePolicy.CLINICAL_FIRST)
    assert not [t for t in starts if entered < t < left], "a training step started during clinical work"
    assert any(t > left for t in starts), "training did not resume"
    assert sum(paused) > 0.8  # it waited out the clinical job
    assert len(waited) == 1 and waited[0] < STEP_S * 4  # the clinical job hardly waited


def test_a_clinical_job_does_not_wait_for_the_step_in_flight(tmp_path: Path) -> None:
    in_step, step_ended = threading.Event(), threading.Event()

    def long_step() -> None:
        with DeviceArbiter(tmp_path).training_step():
            in_step.set()
            time.sleep(2.0)
        step_ended.set()

    trainer = threading.Thread(target=long_step)
    trainer.start()
    assert in_step.wait(10)
    with DeviceArbiter(tmp_path).clinical() as waited:
        assert not step_ended.is_set()  # the clinical job runs beside the step in flight
    assert waited[0] < 1.0
    trainer.join()


def _nice_in_a_step(folder: Path, policy: DevicePolicy) -> tuple[int, int]:
    """(the nice value of the thread inside a training step, this thread's) with ``policy``."""
    seen: list[int] = []

    def step() -> None:
        with DeviceArbiter(folder, policy).training_step():
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
    return seen[0], os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_training_steps_run_at_a_lower_priority_only_under_clinical_first(tmp_path: Path) -> None:
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert _nice_in_a_step(tmp_path, DevicePolicy.CLINICAL_FIRST) == (max(mine, TRAINING_NICE), mine)
    assert _nice_in_a_step(tmp_path, DevicePolicy.SHARE) == (mine, mine)


def test_share_lets_both_run(tmp_path: Path) -> None:
    starts, paused, waited, entered, left = _run(tmp_path, DevicePolicy.SHARE)
    assert len([t for t in starts if entered < t < left]) >= 5 and paused == [] and waited == []
    assert not list(tmp_path.iterdir())  # no lock files: nothing arbitrated


def _holding(folder: Path, side: str) -> subprocess.Popen[str]:
    """A process that holds ``DeviceArbiter(folder).<side>()`` until killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from radfed.inference.model.arbiter import DeviceArbiter\n"
            f"with DeviceArbiter(Path(sys.argv[1])).{side}():\n"
            "    print('held', flush=True); time.sleep(600)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_killed_clinical_process_leaves_no_stuck_lock(tmp_path: Path) -> None:
    holder = _holding(tmp_path, "clinical")
    arbiter = DeviceArbiter(tmp_path)
    blocked = threading.Event()

    def step() -> None:
        with arbiter.training_step():
            blocked.set()

    trainer = threading.Thread(target=step, daemon=True)
    trainer.start()
    assert not blocked.wait(0.5)  # clinical work holds the device
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert blocked.wait(5.0)  # the kernel dropped the dead process's lock: training goes on


def test_a_training_process_killed_inside_a_step_leaves_no_stuck_lock(tmp_path: Path) -> None:
    holder = _holding(tmp_path, "training_step")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # the next training process steps at once (in a thread: a step lowers its thread's priority for good)
    paused: list[float] = []
    stepper = threading.Thread(target=lambda: paused.extend(_one_step(tmp_path)))
    stepper.start()
    stepper.join(timeout=5.0)
    assert not stepper.is_alive() and paused == []


def _one_step(folder: Path) -> list[float]:
    with DeviceArbiter(folder).training_step() as paused:
        return paused


def test_the_site_worker_and_the_node_name_the_same_arbiter(tmp_path: Path) -> None:
    import pytest

    from radfed.federation.site.config import SiteConfig
    from radfed.plugin.node.config import ConfigError, load_config

    site = SiteConfig.from_node_config({"data": "x", "node-state-dir": str(tmp_path)})
    arbiter = site.arbiter()
    assert arbiter is not None and arbiter.folder == tmp_path and arbiter.policy is DevicePolicy.CLINICAL_FIRST
    assert SiteConfig.from_node_config({"data": "x"}).arbiter() is None  # no node beside it
    with pytest.raises(ValueError, match="device-policy"):
        SiteConfig.from_node_config({"data": "x", "device-policy": "gpu-first"})
    node = tmp_path / "node.toml"
    node.write_text(f'[node]\nstate_dir = "{tmp_path}"\ndevice_policy = "share"\n[api]\ntoken = "t"\n')
    assert load_config(node, {}).device_policy is DevicePolicy.SHARE
    node.write_text('[node]\ndevice_policy = "first"\n[api]\ntoken = "t"\n')
    with pytest.raises(ConfigError, match=r"node\.device_policy"):
        load_config(node, {})
