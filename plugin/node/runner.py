"""The job runner: a worker loop claims a queued job under a lease, loads exactly the job's input plan, runs the
model and stores SEG + SR back. Every failure stays with its job, with a reason and a failure kind."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence

import pydicom
from pydicom.dataset import Dataset

from radfed.dicom_sr.outputs import ResultObjects, build_results
from radfed.dicom_sr.profile import OutputProfile
from radfed.inference.dicom.selection import SeriesInfo
from radfed.inference.dicom.study_source import OrthancStudy
from radfed.inference.errors import OrthancRequestError, OrthancUnavailableError, RadfedError
from radfed.inference.model.arbiter import DeviceArbiter
from radfed.inference.model.runtime import OnnxModel
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.pipeline.findings import InferenceResult
from radfed.inference.pipeline.infer_study import StudyAnalysis, analyse_prepared, analyse_study
from radfed.inference.pipeline.input_plan import InputPlan
from radfed.inference.timing import StageTimer
from radfed.plugin.node.config import NodeConfig, NodeRole
from radfed.plugin.node.failures import FailureKind, failure_label
from radfed.plugin.node.ledger.store import Job, JobStatus, Ledger
from radfed.plugin.node.loops import NodeLoop
from radfed.plugin.node.metrics import NodeMetrics
from radfed.plugin.node.prefetch import PreparedAhead, StudyPrefetcher
from radfed.plugin.node.writeback import ResultStore

logger = logging.getLogger(__name__)


class _TimedStudy:
    """An OrthancStudy whose downloads count as the ``fetch`` stage."""

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

    def instances(self, series: SeriesInfo) -> list[tuple[str, str]]:
        return self._study.instances(series)

    def datasets(self, series: SeriesInfo) -> list[Dataset]:
        with self._timer.stage("fetch"):
            return self._study.datasets(series)

    def datasets_at(self, locations: Sequence[str]) -> list[Dataset]:
        with self._timer.stage("fetch"):
            return self._study.datasets_at(locations)


class _SupersededError(Exception):
    """The planned instances are no longer all in Orthanc: a newer examination replaces the job."""


class JobRunner:
    def __init__(
        self,
        client: OrthancClient,
        ledger: Ledger,
        config: NodeConfig,
        metrics: NodeMetrics,
        store: ResultStore,
        profile: OutputProfile,
        arbiter: DeviceArbiter,
        prefetcher: StudyPrefetcher | None,
        worker_id: str,
        *,
        orthanc_seen: Callable[[bool], None],
        reexamine: Callable[[str], None],
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.config = config
        self.metrics = metrics
        self.store = store
        self.profile = profile
        self.arbiter = arbiter
        self.prefetcher = prefetcher
        self.worker_id = worker_id
        self._orthanc_seen = orthanc_seen
        self._reexamine = reexamine

    def work(self, loop: NodeLoop, model: Callable[[], OnnxModel | None], queue_changed: Callable[[], None]) -> None:
        """Claim and run jobs until the loop stops."""
        while not loop.stop.is_set():
            active = model()
            job = self.ledger.claim(self.worker_id, self.config.lease_s, self._claimable(active)) if active else None
            if job is None or active is None:
                loop.idle()
                continue
            loop.busy()
            self.run_job(job, active)
            queue_changed()
            loop.beat()

    def _claimable(self, model: OnnxModel | None) -> tuple[str, str] | None:
        """A worker process takes only its own model's jobs (another worker may serve the others); one process that
        does everything takes any job and skips those of a model it no longer serves."""
        if model is None or self.config.role is not NodeRole.WORKER:
            return None
        return model.artifact.identity.name, model.artifact.identity.version

    def run_job(self, job: Job, model: OnnxModel) -> None:
        timer = StageTimer()
        started = time.perf_counter()
        identity = model.artifact.identity
        if identity.name != job.model_name or identity.version != job.model_version:
            reason = f"model {job.model_name}:{job.model_version} is no longer active"
            self.ledger.finish(job.id, JobStatus.SKIPPED, reason=reason, worker=self.worker_id, attempt=job.attempts)
            return
        try:
            ahead = self._prepared_ahead(job, model)
            with self.arbiter.clinical() as waited:
                analysis = self._analyse(job, model, ahead, timer)
            device_wait = sum(waited)
            if analysis.result.input_fingerprint != job.fingerprint:  # a job without a stored plan planned again
                raise _SupersededError
            predecessor = self._predecessor_sr(job)
            objects = build_results(analysis.result, self.profile, predecessor=predecessor, timer=timer)
            with timer.stage("store"):
                self.store.store(list(objects.datasets()))
        except _SupersededError:
            reason = "instances changed since the job was created; a newer job supersedes it"
            self.ledger.finish(job.id, JobStatus.SKIPPED, reason=reason, worker=self.worker_id, attempt=job.attempts)
            self._reexamine(job.orthanc_study_id)
            return
        except OrthancUnavailableError as exc:
            self._orthanc_seen(False)
            if job.attempts >= self.config.max_attempts:
                reason = f"Orthanc unreachable after {job.attempts} attempts: {exc}"
                self._fail(job, FailureKind.ORTHANC_UNAVAILABLE.value, reason, timer)
            else:
                delay = min(self.config.retry_base_s * 2 ** (job.attempts - 1), self.config.retry_max_s)
                self.ledger.requeue(
                    job.id, delay, f"Orthanc unreachable, retry in {delay:.0f} s", self.worker_id, job.attempts
                )
            return
        except Exception as exc:  # the job boundary: every failure is recorded with its job
            if FailureKind.of(exc) is FailureKind.INTERNAL:
                logger.exception("job %d failed unexpectedly", job.id)
            reason = str(exc) if isinstance(exc, RadfedError) else f"{type(exc).__name__}: {exc}"
            self._fail(job, failure_label(exc), reason, timer)
            return
        self._record(job, model, analysis.result, objects, predecessor, ahead, timer, started, device_wait)

    def _analyse(self, job: Job, model: OnnxModel, ahead: PreparedAhead | None, timer: StageTimer) -> StudyAnalysis:
        if ahead is not None:
            return analyse_prepared(ahead.prepared, model, timer)
        plan = InputPlan.from_json(job.plan)
        source = _TimedStudy(OrthancStudy(self.client, job.orthanc_study_id), timer)
        try:
            return analyse_study(source, model, timer, plan)
        except OrthancRequestError as exc:
            if plan is not None and exc.status == 404:  # a planned instance was deleted meanwhile
                raise _SupersededError from exc
            raise

    def _record(
        self,
        job: Job,
        model: OnnxModel,
        result: InferenceResult,
        objects: ResultObjects,
        predecessor: Dataset | None,
        ahead: PreparedAhead | None,
        timer: StageTimer,
        started: float,
        device_wait: float,
    ) -> None:
        timings = self._timings(timer, started)
        if self.arbiter.active:
            # taking the arbiter's clinical lock (~0: see inference/model/arbiter.py)
            timings["device_wait"] = round(device_wait, 4)
        if ahead is not None:
            timings.update({f"ahead_{stage}": seconds for stage, seconds in ahead.seconds.items()})
        recorded = self.ledger.finish(
            job.id,
            JobStatus.DONE,
            worker=self.worker_id,
            attempt=job.attempts,  # a stale run of this process (its lease taken and claimed again) is fenced too
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
        self.metrics.jobs.labels(JobStatus.DONE.value, "").inc()
        logger.info("job %d done in %.2f s (%d lesions)", job.id, timings["total"], len(result.lesions))

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
            job.id,
            JobStatus.FAILED,
            reason=reason,
            failure_kind=kind,
            timings=timer.as_dict(),
            worker=self.worker_id,
            attempt=job.attempts,
        )
        self.metrics.jobs.labels(JobStatus.FAILED.value, kind.split(":")[0]).inc()

    def _predecessor_sr(self, job: Job) -> Dataset | None:
        previous = self.ledger.previous_done(job.study_instance_uid, job.model_name, job.id)
        sr_uid = previous.result.get("sr_sop_instance_uid") if previous else None
        if not sr_uid:
            return None
        instance = self.client.find_instance(sr_uid)
        if instance is None:
            return None
        return pydicom.dcmread(io.BytesIO(self.client.instance_bytes(instance)))
