"""A worker process keeps its leases while it loads a newly activated model (issue 19 item 2): loading (a warm-up run,
a TensorRT engine build of minutes on a GPU) must not stop the heartbeats, or another process would run the jobs
this worker is still running."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from radfed.inference.model.runtime import OnnxModel
from radfed.inference.orthanc.client import OrthancEndpoint
from radfed.inference.testing.orthanc_server import free_port
from radfed.plugin.node import service as service_module
from radfed.plugin.node.config import NodeConfig, NodeRole
from radfed.plugin.node.ledger.store import JobStatus, Ledger
from radfed.plugin.node.service import NodeService

LEASE_S = 5.0  # heartbeats every 1.7 s: a loaded machine does not make a live worker miss three in a row
LOAD_S = 3 * LEASE_S


def test_a_worker_loading_a_model_keeps_the_leases_of_its_running_jobs(
    tmp_path: Path, tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loading = threading.Event()

    class SlowModel(OnnxModel):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            loading.set()
            time.sleep(LOAD_S)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(service_module, "OnnxModel", SlowModel)
    config = NodeConfig(
        orthanc=OrthancEndpoint(f"http://127.0.0.1:{free_port()}"),  # nobody listens: a worker does not need it here
        state_dir=tmp_path / "state",
        models_dir=tmp_path / "models",
        api_token="t",
        prefetch=False,
        role=NodeRole.WORKER,
        lease_s=LEASE_S,
    )
    node = NodeService(config)
    artifact = node.registry.install(tiny_artifact)  # installed, not active yet
    node.start()  # no active model: nothing loaded, nothing claimed
    other = Ledger(config.ledger_location)  # another process on the same ledger
    try:
        job, _ = other.create_job(
            study_instance_uid="1.2.3", orthanc_study_id="o", model_name="m", model_version="1", fingerprint="f"
        )
        node.registry.activate(artifact.identity.name, artifact.identity.version)
        assert loading.wait(10 * LEASE_S), "the worker did not pick up the activated model"
        assert node.ledger.claim(node.worker.id, LEASE_S) is not None  # as one of its worker threads does
        time.sleep(2 * LEASE_S)  # the model is still loading
        assert other.reclaim_expired() == [], "the worker's lease expired while it loaded a model"
        deadline = time.monotonic() + LOAD_S + 30
        while node.model is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.model is not None
        running = other.job(job.id)
        assert running is not None and running.state is JobStatus.RUNNING and running.attempts == 1
    finally:
        other.close()
        node.stop()
