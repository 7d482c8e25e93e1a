"""One device, two kinds of work: the node's clinical jobs and a site's federated training. The two processes
share an arbiter made of two lock files in the node's state folder (no server): a clinical job that is running
holds ``clinical.lock`` shared, and training takes one step at a time under ``training-step.lock``.

Clinical first (the default): before each step, training waits while any clinical job holds its lock. A clinical
job does not wait for the step in flight: waiting for it cost the job the rest of that step (a DP-SGD step on one
CPU thread takes seconds), while sharing the device for that rest costs less, on a CPU and on a time-sliced GPU
alike. On a CPU the kernel's scheduler does the sharing: the thread that takes training steps runs at nice
``TRAINING_NICE``, so the node's threads get the cores first. The kernel drops a killed process's ``flock``
locks, so neither side can leave the other stuck.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

CLINICAL_LOCK = "clinical.lock"
STEP_LOCK = "training-step.lock"  # held during a step: nobody waits on it, it shows a step in flight
TRAINING_NICE = 10  # a nice-10 thread gets about a tenth of a core against a nice-0 one (CFS weights 110 : 1024)


class DevicePolicy(StrEnum):
    OFF = "off"  # no arbiter: both run as the operating system schedules them
    CLINICAL_FIRST = "clinical-first"  # training pauses at its next step boundary while clinical work runs
    SHARE = "share"  # both run; the wait is not enforced (same as off, named for the admin's intent)


class DeviceArbiter:
    """The arbiter of one node's device, for one process (open once, use from any thread of it)."""

    def __init__(self, folder: Path, policy: DevicePolicy = DevicePolicy.CLINICAL_FIRST) -> None:
        self.policy = policy
        self.folder = folder
        if policy is DevicePolicy.CLINICAL_FIRST:
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def active(self) -> bool:
        return self.policy is DevicePolicy.CLINICAL_FIRST

    def _open(self, name: str) -> int:
        return os.open(self.folder / name, os.O_RDWR | os.O_CREAT, 0o600)

    @contextmanager
    def clinical(self) -> Iterator[list[float]]:
        """Held by a clinical job while it runs; yields [seconds it waited for the lock] (an instant: training
        holds it only between two steps), or [] when the arbiter is off."""
        if not self.active:
            yield []
            return
        clinical = self._open(CLINICAL_LOCK)
        try:
            started = time.perf_counter()
            fcntl.flock(clinical, fcntl.LOCK_SH)  # from here on, training takes no new step
            yield [time.perf_counter() - started]
        finally:
            fcntl.flock(clinical, fcntl.LOCK_UN)
            os.close(clinical)

    @contextmanager
    def training_step(self) -> Iterator[list[float]]:
        """Around one training step: first waits while clinical work holds the device (the seconds paused are
        put in the yielded list), then runs the step under the step lock, in a thread of lower priority."""
        if not self.active:
            yield []
            return
        _lower_this_thread()
        paused: list[float] = []
        clinical = self._open(CLINICAL_LOCK)
        step = self._open(STEP_LOCK)
        try:
            try:
                fcntl.flock(clinical, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                started = time.perf_counter()
                fcntl.flock(clinical, fcntl.LOCK_EX)  # until no clinical job holds it
                paused.append(time.perf_counter() - started)
            fcntl.flock(step, fcntl.LOCK_EX)
            fcntl.flock(clinical, fcntl.LOCK_UN)  # clinical jobs may announce themselves during the step
            yield paused
        finally:
            fcntl.flock(step, fcntl.LOCK_UN)
            os.close(step)
            os.close(clinical)


def _lower_this_thread() -> None:
    """The calling thread (and the threads it starts later) at nice TRAINING_NICE at least: on Linux a nice
    value belongs to a thread, so the node's process and training's other threads keep theirs."""
    thread = threading.get_native_id()
    if os.getpriority(os.PRIO_PROCESS, thread) < TRAINING_NICE:
        os.setpriority(os.PRIO_PROCESS, thread, TRAINING_NICE)
