"""The site worker that keeps torch and the cohort warm between Flower's per-message ClientApp processes:
its wire format, reuse across requests, errors that keep it up, refusal of strangers, and its exit when
the SuperNode it serves is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from multiprocessing.connection import AuthenticationError, Client
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from radfed.federation.site.worker import (
    Frame,
    Request,
    SiteWorkerError,
    _address,
    call_site_worker,
    pack,
    process_alive,
    unpack,
)


def test_frames_round_trip_arrays_and_header_without_pickle() -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64), np.zeros(0, np.uint8)]
    frame = unpack(pack(Frame({"metrics": {"dice": 0.5, "hist": [1, 2]}, "files": ["a"]}, arrays)))
    assert frame.header == {"metrics": {"dice": 0.5, "hist": [1, 2]}, "files": ["a"]}
    assert [a.dtype for a in frame.arrays] == [np.float32, np.int64, np.uint8]
    assert all(np.array_equal(a, b) for a, b in zip(frame.arrays, arrays, strict=True))


def _node_config(data: Path, state: Path) -> dict[str, str]:
    return {"data": str(data), "state-dir": str(state), "site-name": "hospital-x"}


def test_one_warm_worker_serves_every_request_and_survives_a_failed_one(
    synth_root: Path, tmp_path: Path, planned_spec: Any
) -> None:
    state = tmp_path / "state"
    config = {"job": "job-1", "task": "", "held-out-fraction": 0.25, "plan": planned_spec.plan.to_json()}
    first = call_site_worker(
        _node_config(synth_root / "site-1", state), Request.LANDMARKS, Frame({"config": config}, [])
    )
    try:
        assert first.header["metrics"]["landmark_studies"] >= 1
        assert len(first.header["metrics"]["landmarks.t2w"]) == 11
        with pytest.raises(SiteWorkerError, match=r"no usable study|not found|No such"):
            call_site_worker(_node_config(tmp_path / "empty", state), Request.LANDMARKS, Frame({"config": config}, []))
        again = call_site_worker(
            _node_config(synth_root / "site-1", state), Request.LANDMARKS, Frame({"config": config}, [])
        )
        assert again.header["worker_pid"] == first.header["worker_pid"]  # the same warm process
        assert again.header["metrics"] == first.header["metrics"]
        assert (state / "site-worker.key").stat().st_mode & 0o077 == 0
        # A process without the site's key is refused, and the worker goes on serving.
        with pytest.raises(AuthenticationError):
            Client(_address(state, os.getppid()), family="AF_UNIX", authkey=b"not the key")
        assert process_alive(first.header["worker_pid"])
    finally:
        os.kill(first.header["worker_pid"], 9)


def test_worker_exits_when_its_supernode_is_gone(tmp_path: Path) -> None:
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    worker = subprocess.Popen(
        [sys.executable, "-m", "radfed.federation.site.worker", "--state-dir", str(tmp_path), "--parent-pid",
         str(supernode.pid)],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "site-worker.key").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        assert worker.poll() is None, "the worker should run while its SuperNode does"
        supernode.kill()
        supernode.wait()
        assert worker.wait(timeout=10) == 0
    finally:
        supernode.kill()
        worker.kill()
