"""A node service (in this process) on a fresh Orthanc for the node benchmarks, with each study's StableStudy
time taken from Orthanc's /changes by a poller with 0.1 s resolution."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from radfed.inference.model.artifact import load_artifact
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancOptions, start_orthanc
from radfed.inference.testing.synthetic.study import SyntheticStudy
from radfed.inference.testing.synthetic.writer import upload_study
from radfed.plugin.node.config import NodeConfig, load_config
from radfed.plugin.node.ledger.store import Job, JobStatus
from radfed.plugin.node.service import NodeService


def stable_times(client: OrthancClient, stop: threading.Event, seen: dict[str, float]) -> None:
    since = 0
    while not stop.is_set():
        changes, last, _done = client.changes(since, limit=500)
        now = time.time()
        for change in changes:
            if change.change_type == "StableStudy":
                seen.setdefault(change.resource_id, now)
        since = last
        stop.wait(0.1)


@dataclass
class RunningNode:
    service: NodeService
    client: OrthancClient
    config: NodeConfig
    stable: dict[str, float]  # Orthanc study id -> StableStudy seen (wall clock)

    def finished(self) -> int:
        ledger = self.service.ledger
        return len(ledger.jobs(state=JobStatus.DONE, limit=1000)) + len(ledger.jobs(state=JobStatus.FAILED, limit=1000))

    def wait_for(self, count: int) -> None:
        deadline = time.time() + 1800
        while self.finished() < count:
            if time.time() > deadline:
                raise TimeoutError("the node did not finish in 30 min")
            time.sleep(0.05)

    def one_at_a_time(self, studies: list[SyntheticStudy]) -> list[Job]:
        """Sends the studies one at a time, so that no job waits behind another; returns the done jobs."""
        for number, study in enumerate(studies, start=1):
            upload_study(study, self.client)
            self.wait_for(number)
        return self.service.ledger.jobs(state=JobStatus.DONE, limit=1000)

    def latencies(self, jobs: list[Job]) -> list[float]:
        """StableStudy -> SEG + SR stored, per job."""
        return [job.updated - self.stable[job.orthanc_study_id] for job in jobs if job.orthanc_study_id in self.stable]


@contextmanager
def running_node(root: Path, artifact_dir: Path, name: str, **settings: Any) -> Iterator[RunningNode]:
    """A node with ``artifact_dir`` active, its config's fields replaced by ``settings``, StableAge 2 s."""
    artifact = load_artifact(artifact_dir)
    orthanc = start_orthanc(root / f"orthanc-{name}", OrthancOptions(name=name, stable_age_s=2))
    config = load_config(
        None,
        {
            "RADFED_ORTHANC_URL": orthanc.url,
            "RADFED_ORTHANC_PASSWORD": orthanc.options.password,
            "RADFED_STATE_DIR": str(root / f"state-{name}"),
            "RADFED_API_TOKEN": "bench",
        },
    )
    config = replace(config, orthanc=orthanc.endpoint, poll_interval_s=0.2, **settings)
    service = NodeService(config)
    service.registry.install(artifact.folder)
    service.registry.activate(artifact.identity.name, artifact.identity.version)
    stop = threading.Event()
    node = RunningNode(service, OrthancClient(orthanc.endpoint), config, {})
    poller = threading.Thread(target=stable_times, args=(OrthancClient(orthanc.endpoint), stop, node.stable))
    try:
        poller.start()
        service.start()
        yield node
    finally:
        stop.set()
        service.stop()
        orthanc.stop()
        poller.join(timeout=5)
