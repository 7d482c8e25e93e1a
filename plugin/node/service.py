"""The hospital node's lifecycle: the served model, the loops and their health, leases, backups and readiness.

The work is done by three parts, one per loop: :class:`~radfed.plugin.node.follower.ChangeFollower` (Orthanc's
``/changes`` into the inbox), :class:`~radfed.plugin.node.examiner.StudyExaminer` (a stable study into at most one job
per (study, model, version, input fingerprint), planned once) and :class:`~radfed.plugin.node.runner.JobRunner` (a job's
plan loaded, run and stored back as SEG + SR). Failures stay with their job; the service stays up."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from radfed.dicom_sr.profile import OutputProfile, SegEncoding
from radfed.federation.job.alerts import AlertStore, provenance_alerts
from radfed.inference.errors import OrthancUnavailableError, RadfedError
from radfed.inference.model.arbiter import DeviceArbiter
from radfed.inference.model.artifact import ModelArtifact
from radfed.inference.model.device import DeviceReport, DeviceUnavailableError, probe_device
from radfed.inference.model.registry import ModelRegistry
from radfed.inference.model.runtime import OnnxModel
from radfed.inference.orthanc.client import OrthancClient
from radfed.plugin.node.config import Destination, NodeConfig, NodeRole
from radfed.plugin.node.examiner import StudyExaminer
from radfed.plugin.node.follower import ChangeFollower, ReprocessError
from radfed.plugin.node.health import LoopMonitor, LoopStatus
from radfed.plugin.node.ledger.store import JobStatus, Ledger, LedgerBackend, LedgerError, Worker
from radfed.plugin.node.loops import NodeLoop
from radfed.plugin.node.metrics import NodeMetrics
from radfed.plugin.node.prefetch import PrefetchSettings, StudyPrefetcher
from radfed.plugin.node.runner import JobRunner
from radfed.plugin.node.writeback import CStoreStore, OrthancRestStore, ResultStore, StowRsStore

logger = logging.getLogger(__name__)

__all__ = ["ORTHANC_ID", "NodeService", "ReprocessError"]

# Orthanc's resource ids: the SHA-1 of the DICOM identifiers in five dash-separated groups of 8 hex digits.
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")


@dataclass
class ActiveModel:
    model: OnnxModel
    loaded_at: float


class NodeService:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.ledger = Ledger(config.ledger_location)
        self.registry = ModelRegistry(config.models_dir)
        # poisoning alerts of the federated jobs this node's site takes part in (written by its site worker)
        self.alerts = AlertStore(config.state_dir)
        self.metrics = NodeMetrics(self.alerts)
        self.client = OrthancClient(config.orthanc, timeout_s=30.0)
        self.store: ResultStore = self._make_store()
        self.profile = OutputProfile(seg_encoding=SegEncoding(config.seg_encoding), key_images=config.key_images)
        self._active: ActiveModel | None = None
        self._model_lock = threading.Lock()
        self._stop = threading.Event()
        # Wake-ups between the loops (new inbox item, new job), so nothing waits out a polling period.
        self._inbox_event = threading.Event()
        self._job_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self.health = LoopMonitor()
        # the device is shared with a federated site worker pointed at this state folder: clinical jobs first
        self.arbiter = DeviceArbiter(config.state_dir, config.device_policy)
        # the start-up check of the wanted device (cpu | cuda | auto): which provider and why, for /ready
        self.device: DeviceReport = probe_device(config.runtime)
        log = logger.error if self.device.problem else logger.info
        log("inference device: %s (%s)", self.device.provider or "none", self.device.reason)
        self._scp: Any = None
        self.orthanc_reachable = False
        self.prefetcher = (
            StudyPrefetcher(
                OrthancClient(config.orthanc, timeout_s=30.0),
                lambda: self.model,
                PrefetchSettings(quiet_s=config.prefetch_quiet_s, max_studies=config.prefetch_studies),
                on_prepared=lambda ok: self.metrics.prepared_ahead.labels(str(ok).lower()).inc(),
            )
            if config.prefetch and config.role is NodeRole.ALL  # the prepared copy lives in this process's memory
            else None
        )
        # this process as the ledger's workers list shows it; the id owns the leases of the jobs it runs
        self.worker = Worker(
            id=f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}",
            host=socket.gethostname(),
            pid=os.getpid(),
            role=config.role.value,
            device=self._device_text(),
            started=time.time(),
            last_seen=time.time(),
        )
        # the three loops' parts: follow Orthanc, turn stable studies into planned jobs, run jobs
        self.follower = ChangeFollower(
            self.client,
            self.ledger,
            config,
            self.health,
            self.prefetcher,
            wake_examiner=self._inbox_event,
            orthanc_seen=self._set_orthanc,
            queue_changed=self._update_queue_depth,
        )
        self.examiner = StudyExaminer(
            self.client, self.ledger, self.metrics, wake_workers=self._job_event, orthanc_seen=self._set_orthanc
        )
        self.runner = JobRunner(
            self.client,
            self.ledger,
            config,
            self.metrics,
            self.store,
            self.profile,
            self.arbiter,
            self.prefetcher,
            self.worker.id,
            orthanc_seen=self._set_orthanc,
            reexamine=self.notify_stable_study,
        )

    def _make_store(self) -> ResultStore:
        if self.config.destination is Destination.DICOMWEB:
            return StowRsStore(self.config.dicomweb_url or "", self.config.orthanc)
        if self.config.destination is Destination.CSTORE:
            assert self.config.cstore is not None
            return CStoreStore(self.config.cstore)
        return OrthancRestStore(self.client)

    # -- models ----------------------------------------------------------------------------------

    def activate(self, name: str, version: str) -> ModelArtifact:
        """Make an installed model the one served (``load_active_model`` loads it). With ``refuse_flagged_models``,
        a model whose federated job has unresolved poisoning alerts is refused (``UnresolvedAlertsError``)."""
        artifact = self.registry.installed(name, version)
        if self.config.refuse_flagged_models:
            self.alerts.require_resolved(provenance_alerts(artifact.provenance), f"model {artifact.key}")
        return self.registry.activate(name, version)

    def load_active_model(self) -> OnnxModel | None:
        artifact = self.registry.active()
        with self._model_lock:
            if artifact is None:
                self._active = None
            elif self._active is None or self._active.model.artifact.key != artifact.key:
                self._active = None
                if self.device.problem is None:  # else nothing is served: /ready names the missing piece
                    try:
                        model = OnnxModel(artifact, self.config.runtime, device=self.device)
                    except DeviceUnavailableError as exc:  # device = cuda and the session fell back to the CPU
                        logger.error("%s", exc)
                        self.device = DeviceReport(self.device.wanted, None, str(exc), str(exc))
                    else:
                        self._active = ActiveModel(model, time.time())
                        logger.info("serving %s on %s", artifact.key, model.provider)
            self.metrics.model_loaded.set(1 if self._active else 0)
            return self._active.model if self._active else None

    @property
    def model(self) -> OnnxModel | None:
        with self._model_lock:
            return self._active.model if self._active else None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        # a new ledger follows Orthanc from now: the coordinator's business, not a worker's
        self.follower.start_from_now = self.config.role is not NodeRole.WORKER and self.ledger.is_new()
        if self.follower.start_from_now:
            with contextlib.suppress(OrthancUnavailableError):  # else the follower does it on first contact
                self.follower.skip_history()
        self.load_active_model()
        self._renew_leases()
        if self.config.scp is not None:
            from radfed.plugin.node.scp import start_storage_scp

            self._scp = start_storage_scp(OrthancClient(self.config.orthanc), self.config.scp)
        role = self.config.role
        loops: list[tuple[str, Any]] = [("leases", self._keep_leases)]
        if role is not NodeRole.WORKER:
            loops += [("follower", self._follow), ("examiner", self._examine), ("reconciler", self._reconcile)]
        if role is not NodeRole.COORDINATOR:
            loops += [(f"worker-{i}", self._work) for i in range(self.config.concurrency)]
        if self.prefetcher is not None:
            loops.append(("prefetch", self._prefetch))
        if role is NodeRole.WORKER:
            loops.append(("models", self._follow_models))
        backs_up = self.config.ledger_backup_interval_s > 0 and self.ledger.backend is LedgerBackend.SQLITE
        if backs_up and role is not NodeRole.WORKER:
            loops.append(("ledger-backup", self._back_up_ledger))
        for name, target in loops:
            thread = threading.Thread(target=self._guarded, args=(name, target), name=f"radfed-{name}", daemon=True)
            self.health.register(name, thread, beats=name != "prefetch")
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._inbox_event.set()
        self._job_event.set()
        if self._scp is not None:
            self._scp.shutdown()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        self.ledger.close()
        self.client.close()
        if self.prefetcher is not None:
            self.prefetcher.close()

    def _guarded(self, name: str, loop: Any) -> None:
        """A loop that must never die: log, tell the health monitor and continue after anything unexpected."""
        while not self._stop.is_set():
            try:
                loop(name)
                return
            except Exception as exc:
                self.health.failed(name, exc)
                logger.exception("%s loop failed; restarting it in 1 s", name)
                self._stop.wait(1.0)

    def notify_stable_study(self, orthanc_study_id: str) -> None:
        """A push from the Orthanc plugin (or the API): examine this study soon."""
        if not ORTHANC_ID.fullmatch(orthanc_study_id):
            raise ValueError("not an Orthanc study id")
        self.ledger.receive([(orthanc_study_id, -1)], cursor=None)
        self._inbox_event.set()

    def reprocess_since(self, since: str) -> int:
        """See :meth:`ChangeFollower.reprocess_since`."""
        return self.follower.reprocess_since(since)

    # -- the loops -----------------------------------------------------------------------------------

    def _follow(self, name: str) -> None:
        self.follower.follow(name, self._stop)

    def _reconcile(self, name: str) -> None:
        self.follower.reconcile(name, self._stop)

    def _examine(self, name: str) -> None:
        # an inbox item while no model is loaded: try loading the active one (installed meanwhile)
        loop = NodeLoop(name, self._stop, self._inbox_event, self.health)
        self.examiner.run(loop, lambda: self.model or self.load_active_model(), self.config.retry_base_s)

    def _work(self, name: str) -> None:
        loop = NodeLoop(name, self._stop, self._job_event, self.health)
        self.runner.work(loop, lambda: self.model, self._update_queue_depth)

    def _set_orthanc(self, up: bool) -> None:
        if up != self.orthanc_reachable:
            logger.log(logging.INFO if up else logging.WARNING, "Orthanc %s", "reachable" if up else "unreachable")
        self.orthanc_reachable = up
        self.metrics.orthanc_up.set(1 if up else 0)

    def _update_queue_depth(self) -> None:
        self.metrics.queue_depth.set(self.ledger.counts().get(JobStatus.QUEUED.value, 0) + self.ledger.inbox_depth())

    def _back_up_ledger(self, name: str) -> None:
        """An online copy of the ledger at start and then every interval, the newest few kept."""
        while not self._stop.is_set():
            try:
                copy = self.ledger.backup(self.config.backup_dir, self.config.ledger_backups)
            except (OSError, LedgerError) as exc:
                # reported as failing until a copy succeeds; tried again in a minute, not once a second
                self.health.failed(name, exc)
                logger.warning("ledger backup failed: %s", exc)
                self._stop.wait(min(60.0, self.config.ledger_backup_interval_s))
                continue
            logger.info("ledger backed up to %s", copy.name)
            self.health.beat(name)
            deadline = time.monotonic() + self.config.ledger_backup_interval_s
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.health.beat(name)  # waiting is this loop's work
                self._stop.wait(min(10.0, self.config.ledger_backup_interval_s))

    def _backup_policy(self) -> str:
        if self.ledger.backend is not LedgerBackend.SQLITE:
            return "not by the node: PostgreSQL is backed up by its DBA (pg_dump, WAL archiving)"
        if self.config.ledger_backup_interval_s <= 0:
            return "off (ledger_backup_interval_s = 0)"
        return f"online copies every {self.config.ledger_backup_interval_s:g} s in {self.config.backup_dir}"

    def _device_text(self) -> str:
        provider = self.device.provider or "none"
        return f"{'gpu' if provider.startswith(('CUDA', 'Tensorrt')) else 'cpu'} ({provider})"

    def _renew_leases(self) -> None:
        """Heartbeat (this process's row, its jobs' leases) and run again the jobs of workers that stopped."""
        self.ledger.heartbeat(dataclasses.replace(self.worker, device=self._device_text()), self.config.lease_s)
        for job_id, owner in self.ledger.reclaim_expired():
            logger.warning("job %d: the lease of worker %s expired; queued again", job_id, owner)
            self._job_event.set()

    def _keep_leases(self, name: str) -> None:
        while not self._stop.wait(min(self.config.lease_s / 3, 10.0)):  # 10 s at most: the loop must beat
            self._renew_leases()
            self.health.beat(name)

    def _follow_models(self, name: str) -> None:
        """A worker loads a model activated in its models folder (shared, or by its own API). Not in the leases loop:
        loading (a warm-up run, a TensorRT engine build of minutes) must never hold up the heartbeats."""
        while not self._stop.wait(min(self.config.lease_s / 3, 10.0)):
            self.health.busy(name)
            self.load_active_model()
            self.health.beat(name)

    def _prefetch(self, name: str) -> None:
        if self.prefetcher is not None:
            self.prefetcher.run(self._stop)

    # -- status --------------------------------------------------------------------------------------

    def readiness(self) -> dict[str, Any]:
        """Ready only when Orthanc answers, a model is loaded, the ledger can be read and written and every
        loop is going round; ``problems`` says what is wrong, in words."""
        problems: list[str] = []
        try:
            self.client.system()
            self._set_orthanc(True)
        except RadfedError:
            self._set_orthanc(False)
            problems.append("Orthanc does not answer")
        model = self.model
        if model is None:
            problems.append("no active model")
        device = model.device if model is not None else self.device
        if device.problem is not None:
            problems.append(device.problem)
        jobs: dict[str, int] | None = None
        inbox: int | None = None
        try:
            self.ledger.probe_write()
            jobs, inbox = self.ledger.counts(), self.ledger.inbox_depth()
            ledger = "ok"
        except LedgerError as exc:
            ledger = f"{type(exc).__name__}: {exc}"
            problems.append(f"the ledger cannot be written or read ({ledger})")
        loops = {}
        for report in self.health.report():
            loops[report.name] = report.as_dict()
            healthy = report.status is LoopStatus.OK
            self.metrics.loop_healthy.labels(report.name).set(1 if healthy else 0)
            if not healthy:
                problems.append(f"loop {report.name} {report.status.value}: {report.reason}")
        ready = not problems
        self.metrics.ready.set(1 if ready else 0)
        return {
            "ready": ready,
            "problems": problems,
            "orthanc_reachable": self.orthanc_reachable,
            "model": model.artifact.key if model else None,
            "provider": model.provider if model else None,
            "device": device.as_dict(),
            "ledger": ledger,
            "ledger_backend": self.ledger.backend.value,
            "role": self.config.role.value,
            "worker": self.worker.id,
            "ledger_backups": self._backup_policy(),
            "loops": loops,
            "jobs": jobs,
            "inbox": inbox,
        }
