"""One device, two kinds of work: the node's clinical jobs and a site's federated training. The two processes
share an arbiter made of two lock files in the node's state folder (no server): a clinical job that is waiting
or running holds ``clinical.lock`` shared, and training takes one step at a time under ``training-step.lock``.

Clinical first (the default): before each step, training waits while any clinical job holds its lock; a clinical
job that arrives during a step waits for that one step only (the wait is reported in the job's timings). The
kernel drops a killed process's ``flock`` locks, so neither side can leave the other stuck.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

CLINICAL_LOCK = "clinical.lock"
STEP_LOCK = "training-step.lock"


class DevicePolicy(StrEnum):
    OFF = "off"  # no arbiter: both run as the operating system schedules them
    CLINICAL_FIRST = "clinical-first"  # training pauses at its next step boundary while clinical work waits
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
        """Held by a clinical job while it runs; yields a list that receives the seconds it waited for a
        training step in flight (empty when the arbiter is off)."""
        if not self.active:
            yield []
            return
        waited: list[float] = []
        clinical = self._open(CLINICAL_LOCK)
        try:
            fcntl.flock(clinical, fcntl.LOCK_SH)  # from here on, training takes no new step
            step = self._open(STEP_LOCK)
            try:
                started = time.perf_counter()
                fcntl.flock(step, fcntl.LOCK_SH)  # the step in flight, if any, ends
                waited.append(time.perf_counter() - started)
                fcntl.flock(step, fcntl.LOCK_UN)
            finally:
                os.close(step)
            yield waited
        finally:
            fcntl.flock(clinical, fcntl.LOCK_UN)
            os.close(clinical)

    @contextmanager
    def training_step(self) -> Iterator[list[float]]:
        """Around one training step: first waits while clinical work holds the device (the seconds paused are
        put in the yielded list), then runs the step under the step lock."""
        if not self.active:
            yield []
            return
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
