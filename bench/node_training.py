"""``bench node``'s column "while a federated round trains on the same node": the node's StableStudy -> stored
latency beside a site's training process (``bench.site_training``: the site's round code, DP-SGD, one torch
thread, sharing the node's state folder), with the device arbiter off and clinical-first, and what the
clinical jobs cost the training steps."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.running_node import running_node
from bench.site_training import read_steps
from radfed.inference.model.arbiter import DevicePolicy
from radfed.inference.testing.synthetic.study import SyntheticStudy

WARM_STEPS = 2  # steps left out at the start (the first steps pay for warm-up)
ALONE_STEPS = int(os.environ.get("RADFED_BENCH_ALONE_STEPS", "8"))  # steps timed before the first study
LOCAL_STEPS = 100_000  # one round outlasts the measurement (a round's start evaluates, outside the arbiter)


@dataclass(frozen=True)
class StepTimes:
    """A stretch of training steps: median wall and CPU seconds inside a step, steps per minute, seconds paused."""

    step: float
    cpu: float
    per_minute: float
    paused: float
    count: int


@dataclass(frozen=True)
class BesideTraining:
    policy: DevicePolicy
    latency: float  # StableStudy -> stored, median s
    model: float  # the job's model stage, median s
    device_wait: float | None  # for the device (the job's device_wait), median s (None: arbiter off)
    alone: StepTimes
    beside: StepTimes


def step_times(steps: list[dict[str, float]], start: float, end: float) -> StepTimes:
    """The steps that ended in [start, end)."""
    inside = [s for s in steps if start <= s["left"] < end]
    if not inside:
        raise RuntimeError(f"no training step ended in a {end - start:.0f} s window: training stalled")
    return StepTimes(
        step=statistics.median(s["left"] - s["entered"] for s in inside),
        cpu=statistics.median(s["cpu"] for s in inside),
        per_minute=len(inside) / (end - start) * 60,
        paused=sum(s["paused"] for s in inside),
        count=len(inside),
    )


def _wait_for_steps(record: Path, count: int, trainer: subprocess.Popen[bytes], log: Path) -> list[dict[str, float]]:
    deadline = time.time() + 900
    while len(steps := read_steps(record)) < count:
        if trainer.poll() is not None:
            raise RuntimeError(f"the training process exited with {trainer.returncode}: see {log}")
        if time.time() > deadline:
            raise TimeoutError(f"the training process took no {count} steps in 15 min")
        time.sleep(0.2)
    return steps


def run_beside_training(
    root: Path, artifact_dir: Path, studies: list[SyntheticStudy], train_data: Path, policy: DevicePolicy
) -> BesideTraining:
    """The node's latency over ``studies`` sent one at a time while a site's round trains beside it under
    ``policy``; the site trains on the studies in ``train_data``."""
    name = f"beside-{policy.value}"
    record = root / f"{name}-steps.jsonl"
    log = root / f"{name}-training.log"
    with running_node(root, artifact_dir, name, device_policy=policy) as node:
        command = [
            sys.executable,
            "-m",
            "bench.site_training",
            f"--data={train_data}",
            f"--state-dir={root / f'{name}-site'}",
            f"--node-state-dir={node.config.state_dir}",
            f"--policy={policy.value}",
            f"--record={record}",
            f"--local-steps={LOCAL_STEPS}",
            "--rounds=1",
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with log.open("wb") as out:
            trainer = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            warm = _wait_for_steps(record, WARM_STEPS, trainer, log)[-1]["left"]
            first_study = _wait_for_steps(record, WARM_STEPS + ALONE_STEPS, trainer, log)[-1]["left"]
            jobs = node.one_at_a_time(studies)
            last_stored = time.time()
            if trainer.poll() is not None:
                raise RuntimeError(f"the training process exited with {trainer.returncode}: see {log}")
        finally:
            trainer.terminate()
            trainer.wait()
    steps = read_steps(record)
    waits = [job.timings["device_wait"] for job in jobs if "device_wait" in job.timings]
    return BesideTraining(
        policy=policy,
        latency=statistics.median(node.latencies(jobs)),
        model=statistics.median(job.timings.get("model", 0.0) for job in jobs),
        device_wait=statistics.median(waits) if waits else None,
        alone=step_times(steps, warm, first_study + 1e-6),
        beside=step_times(steps, first_study + 1e-6, last_stored),
    )


def training_rows(idle_latency: float, idle_model: float, runs: list[BesideTraining]) -> list[list[str]]:
    """Rows of the table: the idle node, then one column per arbiter setting."""

    def row(label: str, idle: str, value: Callable[[BesideTraining], str]) -> list[str]:
        return [label, idle, *(value(r) for r in runs)]

    return [
        row("StableStudy -> SEG + SR stored", f"{idle_latency:.2f}", lambda r: f"{r.latency:.2f}"),
        row("/ idle (goal <= 1.3 with the arbiter on)", "1.00", lambda r: f"{r.latency / idle_latency:.2f}"),
        row("model stage", f"{idle_model:.2f}", lambda r: f"{r.model:.2f}"),
        row(
            "clinical job's wait for the device (device_wait)",
            "-",
            lambda r: "-" if r.device_wait is None else f"{r.device_wait:.2f}",
        ),
        row("training step, training alone: wall (CPU)", "-", lambda r: f"{r.alone.step:.2f} ({r.alone.cpu:.2f})"),
        row(
            "training step, beside clinical jobs: wall (CPU)",
            "-",
            lambda r: f"{r.beside.step:.2f} ({r.beside.cpu:.2f})",
        ),
        row("training step slowdown (beside / alone)", "-", lambda r: f"{r.beside.step / r.alone.step:.2f}"),
        row(
            "training steps per minute, alone -> beside",
            "-",
            lambda r: f"{r.alone.per_minute:.1f} -> {r.beside.per_minute:.1f}",
        ),
        row("training paused for clinical jobs (s, in all)", "-", lambda r: f"{r.beside.paused:.1f}"),
    ]
