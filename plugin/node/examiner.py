"""The examiner: each stable study in the inbox becomes at most one job per (study, model, version, input
fingerprint). The study is planned here, once, from headers (Orthanc's ``/tags?short``, never an instance file);
the job stores the plan and loads exactly it. A study that cannot be planned gets a failed job with the reason."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from radfed.inference.dicom.selection import NoMatchingSeriesError
from radfed.inference.dicom.study_source import OrthancStudy
from radfed.inference.errors import OrthancRequestError, OrthancUnavailableError, RadfedError
from radfed.inference.model.runtime import OnnxModel
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.pipeline.findings import ModelIdentity, input_fingerprint
from radfed.inference.pipeline.input_plan import InputPlan, image_fingerprint, plan_inputs, study_series
from radfed.plugin.node.failures import FailureKind, failure_label
from radfed.plugin.node.ledger.store import Job, JobStatus, Ledger, LedgerError
from radfed.plugin.node.loops import NodeLoop
from radfed.plugin.node.metrics import NodeMetrics

logger = logging.getLogger(__name__)


class StudyExaminer:
    def __init__(
        self,
        client: OrthancClient,
        ledger: Ledger,
        metrics: NodeMetrics,
        *,
        wake_workers: threading.Event,
        orthanc_seen: Callable[[bool], None],
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.metrics = metrics
        self._wake_workers = wake_workers
        self._orthanc_seen = orthanc_seen

    def run(self, loop: NodeLoop, model: Callable[[], OnnxModel | None], retry_s: float) -> None:
        """Examine the inbox until the loop stops; a study is taken off the inbox once it has its job."""
        while not loop.stop.is_set():
            item = self.ledger.next_inbox()
            active = model() if item is not None else None
            if item is None or active is None:
                loop.idle()
                continue
            study_id, seq = item
            loop.busy()
            try:
                self.examine(study_id, active)
            except OrthancUnavailableError:
                self._orthanc_seen(False)
                self.ledger.inbox_retry(study_id, retry_s)
                loop.beat()
                continue
            except OrthancRequestError as exc:
                if exc.status == 404:
                    logger.info("study %s left Orthanc before it was examined", study_id)
                elif exc.status >= 500 or exc.status == 429:
                    self.ledger.inbox_retry(study_id, retry_s)
                    loop.beat()
                    continue
                else:
                    self.unexaminable(study_id, active, exc)
            except LedgerError:
                raise  # the ledger itself (a full disk): the loop fails and /ready says so
            except Exception as exc:  # noqa: BLE001 - one study's headers must never stop the others' examination
                self.unexaminable(study_id, active, exc)
            self.ledger.inbox_done(study_id, seq)
            loop.beat()

    def examine(self, orthanc_study_id: str, model: OnnxModel) -> Job:
        """Create (or find) the job for the study as it is now, with its input plan."""
        identity = model.artifact.identity
        study = OrthancStudy(self.client, orthanc_study_id)
        series = study_series(study)
        try:
            plan = plan_inputs(study.study_instance_uid, series, model.artifact.spec)
        except NoMatchingSeriesError as exc:
            # Keyed on every image instance: the same content fails once; new instances get a new try.
            job, created = self.ledger.create_job(
                study_instance_uid=study.study_instance_uid,
                orthanc_study_id=orthanc_study_id,
                model_name=identity.name,
                model_version=identity.version,
                fingerprint=image_fingerprint(series),
                state=JobStatus.FAILED,
                reason=str(exc),
                failure_kind=FailureKind.NO_MATCHING_SERIES.value,
            )
            if created:
                self.metrics.jobs.labels(JobStatus.FAILED.value, FailureKind.NO_MATCHING_SERIES.value).inc()
            return job
        return self.queue(orthanc_study_id, identity, plan)

    def queue(self, orthanc_study_id: str, identity: ModelIdentity, plan: InputPlan) -> Job:
        job, created = self.ledger.create_job(
            study_instance_uid=plan.study_instance_uid,
            orthanc_study_id=orthanc_study_id,
            model_name=identity.name,
            model_version=identity.version,
            fingerprint=plan.fingerprint,
            selection=plan.describe(),
            plan=plan.to_json(),
        )
        logger.info("study %s: job %d %s", orthanc_study_id, job.id, "queued" if created else f"exists ({job.state})")
        if created:
            self._wake_workers.set()
        return job

    def unexaminable(self, orthanc_study_id: str, model: OnnxModel, error: Exception) -> None:
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
            state=JobStatus.FAILED,
            reason=f"the study could not be examined: {type(error).__name__}: {error}"[:500],
            failure_kind=kind,
        )
        if created:
            self.metrics.jobs.labels(JobStatus.FAILED.value, kind.split(":")[0]).inc()
