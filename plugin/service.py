"""The hospital node: follows Orthanc's ``/changes`` (StableStudy) from a persisted cursor, turns each
stable study into at most one job per (study, model, version, input fingerprint), runs jobs with
bounded concurrency, and stores SEG + SR back. Failures stay with their job; the service stays up."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from radfed.dicom_sr.outputs import build_results
from radfed.dicom_sr.profile import OutputProfile, SegEncoding
from radfed.federation.alerts import AlertStore, provenance_alerts
from radfed.inference.arbiter import DeviceArbiter
from radfed.inference.artifact import ModelArtifact
from radfed.inference.device import DeviceReport, DeviceUnavailableError, probe_device
from radfed.inference.errors import (
    OrthancRequestError,
    OrthancUnavailableError,
    RadfedError,
)
from radfed.inference.findings import ModelIdentity, input_fingerprint
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.pipeline import analyse_prepared, analyse_study
from radfed.inference.registry import ModelRegistry
from radfed.inference.runtime import OnnxModel
from radfed.inference.selection import NoMatchingSeriesError, SeriesInfo, select_series
from radfed.inference.study_source import OrthancStudy
from radfed.inference.timing import StageTimer
from radfed.plugin.config import Destination, NodeConfig, NodeRole
from radfed.plugin.failures import FailureKind, failure_label
from radfed.plugin.health import LoopMonitor, LoopStatus
from radfed.plugin.ledger import Job, JobState, Ledger, LedgerBackend, LedgerError, Worker
from radfed.plugin.metrics import NodeMetrics
from radfed.plugin.prefetch import PrefetchSettings, PreparedAhead, StudyPrefetcher
from radfed.plugin.writeback import CStoreStore, OrthancRestStore, ResultStore, StowRsStore

logger = logging.getLogger(__name__)


class ReprocessError(RadfedError, ValueError):
    """A reprocessing request that names no valid date."""


STABLE_STUDY = "StableStudy"
# The examiner and workers poll the local ledger (cheap); only the /changes follower polls Orthanc.
LEDGER_POLL_S = 0.25
# Orthanc's resource ids: the SHA-1 of the DICOM identifiers in five dash-separated groups of 8 hex digits.
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")


class _TimedStudy:
    """An OrthancStudy whose instance downloads count as the ``fetch`` stage."""

    def __init__(self, study: OrthancStudy, timer: StageTimer) -> None:
        self._study = study
        self._timer = timer

    @property
    def study_instance_uid(self) -> str:
        return self._study.study_instance_uid

    @property
    def accession_number(self) -> str:
        return self._study.accession_number

    def series(self) -> list[SeriesInfo]:
        with self._timer.stage("fetch"):
            return self._study.series()

    def sop_instance_uids(self, series: SeriesInfo) -> list[str]:
        return self._study.sop_instance_uids(series)

    def datasets(self, series: SeriesInfo) -> list[Dataset]:
        with self._timer.stage("fetch"):
            return self._study.datasets(series)


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
        self._start_from_now = False
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
        self._start_from_now = self.config.role is not NodeRole.WORKER and self.ledger.is_new()
        if self._start_from_now:
            with contextlib.suppress(OrthancUnavailableError):  # else the follower does it on first contact
                self._skip_history()
        self.load_active_model()
        self._renew_leases()
        if self.config.scp is not None:
            from radfed.plugin.scp import start_storage_scp

            self._scp = start_storage_scp(OrthancClient(self.config.orthanc), self.config.scp)
        role = self.config.role
        loops: list[tuple[str, Any]] = [("leases", self._keep_leases)]
        if role is not NodeRole.WORKER:
            loops += [("follower", self._follow_changes), ("examiner", self._examine_inbox)]
            loops += [("reconciler", self._reconcile)]
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

    # -- following Orthanc -------------------------------------------------------------------------

    def _skip_history(self) -> None:
        """A new (or lost) ledger beside an Orthanc with history follows from now: re-running every stored
        study is an explicit decision (``reprocess_since``), never a side effect of a missing file."""
        last = int(self.client.get_json("/changes", params={"last": ""})["Last"])
        self.ledger.set_cursor(last)
        self._start_from_now = False
        if last:
            logger.warning(
                "new ledger: following Orthanc from change %d; studies stored before are not processed "
                "(radfed serve --reprocess-since DATE runs them)",
                last,
            )

    def reprocess_since(self, since: str) -> int:
        """Put every study that became stable in Orthanc since ``since`` (YYYYMMDD or YYYYMMDDTHHMMSS, Orthanc's
        change dates) in the inbox again; a job whose input did not change is found, not re-run."""
        try:
            datetime.strptime(since, "%Y%m%dT%H%M%S" if "T" in since else "%Y%m%d")
        except ValueError:
            raise ReprocessError(f"since must be a date YYYYMMDD or YYYYMMDDTHHMMSS, got {since[:20]!r}") from None
        seq, studies = 0, {}
        while True:
            answer = self.client.get_json("/changes", params={"since": seq, "limit": 1000})
            for change in answer["Changes"]:
                if change["ChangeType"] == STABLE_STUDY and str(change.get("Date", "")) >= since:
                    studies[str(change["ID"])] = int(change["Seq"])
            seq = int(answer["Last"])
            if answer["Done"]:
                break
        self.ledger.receive(sorted(studies.items(), key=lambda item: item[1]), cursor=None)
        self._inbox_event.set()
        logger.info("reprocessing %d stable studies since %s", len(studies), since)
        return len(studies)

    def _follow_changes(self, name: str) -> None:
        backoff = self.config.retry_base_s
        while not self._stop.is_set():
            if self._start_from_now:
                with contextlib.suppress(OrthancUnavailableError):  # noticed again just below
                    self._skip_history()
            since = self.ledger.cursor()
            try:
                changes, last, done = self.client.changes(since, limit=200)
            except OrthancUnavailableError:
                self._set_orthanc(False)
                self.health.beat(name)  # waiting for Orthanc is this loop's job (readiness reports Orthanc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.retry_max_s)
                continue
            self._set_orthanc(True)
            backoff = self.config.retry_base_s
            stable = [(c.resource_id, c.seq) for c in changes if c.change_type == STABLE_STUDY]
            changed = self._changed_studies(changes)
            if self.prefetcher is not None:
                for change in changes:
                    if change.change_type == STABLE_STUDY:
                        self.prefetcher.stable(change.resource_id)
                    else:
                        self.prefetcher.notice(change.change_type, change.resource_id)
            if changes or last != since:
                self.ledger.receive(stable, cursor=last, changed=changed)
                if stable:
                    self._inbox_event.set()
            self._update_queue_depth()
            self.health.beat(name)
            if done:
                self._stop.wait(self.config.poll_interval_s)

    def _changed_studies(self, changes: list[Any]) -> list[str]:
        """The studies a batch of changes created or added a series to (reconciled if no StableStudy follows)."""
        studies = {c.resource_id for c in changes if c.change_type == "NewStudy"}
        for change in changes:
            if change.change_type == "NewSeries":
                try:
                    studies.add(str(self.client.get_json(f"/series/{change.resource_id}")["ParentStudy"]))
                except (OrthancRequestError, KeyError, TypeError):
                    continue  # the series is gone again: nothing to reconcile
        return sorted(studies)

    def _reconcile(self, name: str) -> None:
        """Studies left without StableStudy (an Orthanc crash inside StableAge) are examined once quiet and
        stable in Orthanc's eyes; one still receiving instances waits."""
        while not self._stop.is_set():
            examine: list[str] = []
            forget: list[str] = []
            wait: list[str] = []
            for study_id in self.ledger.quiet_pending(self.config.reconcile_quiet_s):
                try:
                    stable = bool(self.client.get_json(f"/studies/{study_id}").get("IsStable", True))
                except OrthancUnavailableError:
                    break  # the follower reports the outage; try again next round
                except OrthancRequestError as exc:
                    if exc.status == 404:
                        forget.append(study_id)
                    continue
                (examine if stable else wait).append(study_id)
            self.ledger.settle_pending(examine, forget, wait)
            if examine:
                logger.warning("%d study(ies) changed but never got StableStudy (Orthanc restarted?)", len(examine))
                self._inbox_event.set()
            self.health.beat(name)
            self._stop.wait(self.config.reconcile_interval_s)

    def _set_orthanc(self, up: bool) -> None:
        if up != self.orthanc_reachable:
            logger.log(logging.INFO if up else logging.WARNING, "Orthanc %s", "reachable" if up else "unreachable")
        self.orthanc_reachable = up
        self.metrics.orthanc_up.set(1 if up else 0)

    def _update_queue_depth(self) -> None:
        self.metrics.queue_depth.set(self.ledger.counts().get(JobState.QUEUED.value, 0) + self.ledger.inbox_depth())

    # -- from stable study to job ------------------------------------------------------------------

    def _examine_inbox(self, name: str) -> None:
        while not self._stop.is_set():
            item = self.ledger.next_inbox()
            model = self.model if item is not None else None
            if item is None or model is None:
                if item is not None:
                    self.load_active_model()
                self.health.beat(name)
                self._inbox_event.wait(LEDGER_POLL_S)
                self._inbox_event.clear()
                continue
            study_id, seq = item
            self.health.busy(name)
            try:
                self.examine(study_id, model)
            except OrthancUnavailableError:
                self._set_orthanc(False)
                self.ledger.inbox_retry(study_id, self.config.retry_base_s)
                self.health.beat(name)
                continue
            except OrthancRequestError as exc:
                if exc.status == 404:
                    logger.info("study %s left Orthanc before it was examined", study_id)
                elif exc.status >= 500 or exc.status == 429:
                    self.ledger.inbox_retry(study_id, self.config.retry_base_s)
                    self.health.beat(name)
                    continue
                else:
                    self._unexaminable(study_id, model, exc)
            except LedgerError:
                raise  # the ledger itself (a full disk): the loop fails and /ready says so
            except Exception as exc:  # noqa: BLE001 - one study's headers must never stop the others' examination
                self._unexaminable(study_id, model, exc)
            self.ledger.inbox_done(study_id, seq)
            self.health.beat(name)

    def _unexaminable(self, orthanc_study_id: str, model: OnnxModel, error: Exception) -> None:
        """A failed job, with the reason, for a study that could not even be examined. It is keyed on the
        study's instances, so the same content fails once and new instances get a new try."""
        logger.warning("study %s could not be examined: %s", orthanc_study_id, type(error).__name__)
        try:
            instances = self.client.get_json(f"/studies/{orthanc_study_id}/instances")
            uids = [str(i.get("MainDicomTags", {}).get("SOPInstanceUID", i.get("ID", ""))) for i in instances]
            study_uid = str(self.client.get_json(f"/studies/{orthanc_study_id}")["MainDicomTags"]["StudyInstanceUID"])
        except (RadfedError, KeyError, TypeError):
            uids, study_uid = [orthanc_study_id], ""
        identity = model.artifact.identity
        kind = failure_label(error, examining=True)
        _, created = self.ledger.create_job(
            study_instance_uid=study_uid or f"orthanc:{orthanc_study_id}",
            orthanc_study_id=orthanc_study_id,
            model_name=identity.name,
            model_version=identity.version,
            fingerprint=input_fingerprint(uids),
            state=JobState.FAILED,
            reason=f"the study could not be examined: {type(error).__name__}: {error}"[:500],
            failure_kind=kind,
        )
        if created:
            self.metrics.jobs.labels(JobState.FAILED.value, kind.split(":")[0]).inc()

    def examine(self, orthanc_study_id: str, model: OnnxModel) -> Job:
        """Create (or find) the job for the study as it is now."""
        identity = model.artifact.identity
        ahead = self.prefetcher.peek(orthanc_study_id, model.artifact.key) if self.prefetcher else None
        if ahead is not None and self._unchanged_since_prepared(orthanc_study_id, ahead):
            # One listing instead of a header download per series: the prepared selection still holds.
            loaded = ahead.prepared.loaded
            return self._queue_job(
                str(getattr(loaded.reference_datasets[0], "StudyInstanceUID", "")),
                orthanc_study_id,
                identity,
                loaded.fingerprint,
                loaded.selection.describe(),
            )
        study = OrthancStudy(self.client, orthanc_study_id)
        spec = model.artifact.spec
        series = study.series()
        try:
            selection = select_series(spec, series)
        except NoMatchingSeriesError as exc:
            # Keyed on every image instance: the same content fails once; new instances get a new try.
            images = [s for s in series if s.modality not in ("SEG", "SR", "PR", "KO")]
            fingerprint = input_fingerprint(uid for s in images for uid in study.sop_instance_uids(s))
            job, created = self.ledger.create_job(
                study_instance_uid=study.study_instance_uid,
                orthanc_study_id=orthanc_study_id,
                model_name=identity.name,
                model_version=identity.version,
                fingerprint=fingerprint,
                state=JobState.FAILED,
                reason=str(exc),
                failure_kind=FailureKind.NO_MATCHING_SERIES.value,
            )
            if created:
                self.metrics.jobs.labels(JobState.FAILED.value, FailureKind.NO_MATCHING_SERIES.value).inc()
            return job
        fingerprint = input_fingerprint(
            uid for info in selection.chosen.values() for uid in study.sop_instance_uids(info)
        )
        return self._queue_job(study.study_instance_uid, orthanc_study_id, identity, fingerprint, selection.describe())

    def _queue_job(
        self, study_uid: str, orthanc_study_id: str, identity: ModelIdentity, fingerprint: str, selection: list[str]
    ) -> Job:
        job, created = self.ledger.create_job(
            study_instance_uid=study_uid,
            orthanc_study_id=orthanc_study_id,
            model_name=identity.name,
            model_version=identity.version,
            fingerprint=fingerprint,
            selection=selection,
        )
        logger.info("study %s: job %d %s", orthanc_study_id, job.id, "queued" if created else f"exists ({job.state})")
        if created:
            self._job_event.set()
        return job

    def _unchanged_since_prepared(self, orthanc_study_id: str, ahead: PreparedAhead) -> bool:
        """True when the study has the same series and its selected series the same instances as when it was
        prepared (so the job's key is exactly the prepared copy's)."""
        instances = self.client.get_json(f"/studies/{orthanc_study_id}/instances")
        if {str(i["ParentSeries"]) for i in instances} != ahead.series_ids:
            return False
        chosen = {info.handle for info in ahead.prepared.loaded.selection.chosen.values()}
        current = input_fingerprint(
            str(i["MainDicomTags"]["SOPInstanceUID"]) for i in instances if i["ParentSeries"] in chosen
        )
        return current == ahead.prepared.loaded.fingerprint

    # -- running jobs ------------------------------------------------------------------------------

    def _work(self, name: str) -> None:
        while not self._stop.is_set():
            model = self.model
            claimable = self._claimable(model)
            job = self.ledger.claim(self.worker.id, self.config.lease_s, claimable) if model is not None else None
            if job is None or model is None:
                self.health.beat(name)
                self._job_event.wait(LEDGER_POLL_S)
                self._job_event.clear()
                continue
            self.health.busy(name)
            self.run_job(job, model)
            self._update_queue_depth()
            self.health.beat(name)

    def run_job(self, job: Job, model: OnnxModel) -> None:
        timer = StageTimer()
        started = time.perf_counter()
        try:
            if model.artifact.identity.name != job.model_name or model.artifact.identity.version != job.model_version:
                self.ledger.finish(
                    job.id,
                    JobState.SKIPPED,
                    reason=f"model {job.model_name}:{job.model_version} is no longer active",
                    worker=self.worker.id,
                )
                return
            ahead = self._prepared_ahead(job, model)
            with self.arbiter.clinical() as waited:
                if ahead is not None:
                    analysis = analyse_prepared(ahead.prepared, model, timer)
                else:
                    analysis = analyse_study(
                        _TimedStudy(OrthancStudy(self.client, job.orthanc_study_id), timer), model, timer
                    )
            device_wait = sum(waited)
            if analysis.result.input_fingerprint != job.fingerprint:
                self.ledger.finish(
                    job.id,
                    JobState.SKIPPED,
                    reason="instances changed since the job was created; a newer job supersedes it",
                    worker=self.worker.id,
                )
                self.notify_stable_study(job.orthanc_study_id)
                return
            predecessor = self._predecessor_sr(job)
            objects = build_results(analysis.result, self.profile, predecessor=predecessor, timer=timer)
            with timer.stage("store"):
                self.store.store(list(objects.datasets()))
        except OrthancUnavailableError as exc:
            self._set_orthanc(False)
            if job.attempts >= self.config.max_attempts:
                self._fail(
                    job,
                    FailureKind.ORTHANC_UNAVAILABLE.value,
                    f"Orthanc unreachable after {job.attempts} attempts: {exc}",
                    timer,
                )
            else:
                delay = min(self.config.retry_base_s * 2 ** (job.attempts - 1), self.config.retry_max_s)
                self.ledger.requeue(job.id, delay, f"Orthanc unreachable, retry in {delay:.0f} s", self.worker.id)
            return
        except Exception as exc:
            if FailureKind.of(exc) is FailureKind.INTERNAL:
                logger.exception("job %d failed unexpectedly", job.id)
            reason = str(exc) if isinstance(exc, RadfedError) else f"{type(exc).__name__}: {exc}"
            self._fail(job, failure_label(exc), reason, timer)
            return
        timings = self._timings(timer, started)
        if self.arbiter.active:
            timings["device_wait"] = round(device_wait, 4)  # for a federated training step in flight
        if ahead is not None:
            timings.update({f"ahead_{stage}": seconds for stage, seconds in ahead.seconds.items()})
        result = analysis.result
        recorded = self.ledger.finish(
            job.id,
            JobState.DONE,
            worker=self.worker.id,
            timings=timings,
            result={
                "seg_sop_instance_uid": objects.seg.SOPInstanceUID if objects.seg is not None else None,
                "sr_sop_instance_uid": objects.sr.SOPInstanceUID,
                "series_instance_uids": sorted({ds.SeriesInstanceUID for ds in objects.datasets()}),
                "lesions": len(result.lesions),
                "study_probability": round(result.study_finding.probability, 4),
                "category": result.study_finding.category.meaning,
                "provider": model.provider,
                "precision": model.precision,
                "prepared_ahead": ahead is not None,
                "supersedes": predecessor.SOPInstanceUID if predecessor is not None else None,
            },
        )
        if not recorded:  # stored all the same: the new run's objects carry the same UIDs and replace these
            logger.warning("job %d: its lease expired while it ran (run again elsewhere); result not recorded", job.id)
            return
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.jobs.labels(JobState.DONE.value, "").inc()
        logger.info("job %d done in %.2f s (%d lesions)", job.id, timings["total"], len(result.lesions))

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

    def _claimable(self, model: OnnxModel | None) -> tuple[str, str] | None:
        """A worker process takes only its own model's jobs (another worker may serve the others); one process that
        does everything takes any job and skips those of a model it no longer serves."""
        if model is None or self.config.role is not NodeRole.WORKER:
            return None
        return model.artifact.identity.name, model.artifact.identity.version

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

    def _prepared_ahead(self, job: Job, model: OnnxModel) -> PreparedAhead | None:
        if self.prefetcher is None:
            return None
        ahead, outcome = self.prefetcher.take(job.orthanc_study_id, job.fingerprint, model.artifact.key)
        self.metrics.prefetch.labels(outcome.value).inc()
        return ahead

    def _timings(self, timer: StageTimer, started: float) -> dict[str, float]:
        timings = timer.as_dict()
        # "load" was measured around the downloads too; report it net of "fetch".
        if "load" in timings:
            timings["load"] = round(max(0.0, timings["load"] - timings.get("fetch", 0.0)), 4)
        timings["total"] = round(time.perf_counter() - started, 4)
        return timings

    def _fail(self, job: Job, kind: str, reason: str, timer: StageTimer) -> None:
        logger.warning("job %d failed (%s): %s", job.id, kind, reason)
        self.ledger.finish(
            job.id, JobState.FAILED, reason=reason, failure_kind=kind, timings=timer.as_dict(), worker=self.worker.id
        )
        self.metrics.jobs.labels(JobState.FAILED.value, kind.split(":")[0]).inc()

    def _predecessor_sr(self, job: Job) -> Dataset | None:
        previous = self.ledger.previous_done(job.study_instance_uid, job.model_name, job.id)
        sr_uid = previous.result.get("sr_sop_instance_uid") if previous else None
        if not sr_uid:
            return None
        instance = self.client.find_instance(sr_uid)
        if instance is None:
            return None
        return pydicom.dcmread(io.BytesIO(self.client.instance_bytes(instance)))

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
