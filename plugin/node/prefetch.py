"""Work ahead on studies that are still arriving.

Orthanc declares a study stable only after ``StableAge`` seconds without a new instance (60 s by default).
Meanwhile the node downloads, loads and preprocesses what has arrived, once the study has been quiet for a
moment, so that at StableStudy only the model, the results and their storage remain. A prepared study is
used only by a job whose input fingerprint (the SOP Instance UIDs of the selected series) and model are
exactly the ones it was prepared for; anything else is dropped and the job does the work itself. A study
the prefetcher cannot prepare (a missing series, corrupt pixels) is simply left to its job, which fails
with the reason; the prefetcher never decides a job's outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from radfed.inference.dicom.study_source import OrthancStudy
from radfed.inference.errors import RadfedError
from radfed.inference.model.runtime import OnnxModel
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.pipeline.infer_study import prepare_study
from radfed.inference.pipeline.preprocess import PreparedStudy
from radfed.inference.timing import StageTimer

logger = logging.getLogger(__name__)

RESULT_MODALITIES = frozenset({"SEG", "SR", "PR", "KO"})  # our own results (and other derived objects)


@dataclass(frozen=True)
class PrefetchSettings:
    quiet_s: float = 0.5  # no new instance for this long: prepare what has arrived
    max_studies: int = 4  # prepared studies held in memory at most (the oldest are dropped)
    poll_s: float = 0.2
    forget_after_s: float = 1800.0  # a study that never became stable is dropped after this


@dataclass(frozen=True, eq=False)
class PreparedAhead:
    prepared: PreparedStudy
    model_key: str
    instances: int
    series_ids: frozenset[str]  # every series of the study when it was prepared
    seconds: dict[str, float]  # the stages done ahead: load (downloads included) and preprocess


@dataclass
class _Arriving:
    first_seen: float
    instances: int = -1
    changed_at: float = 0.0
    ready: PreparedAhead | None = None
    preparing: bool = False
    failed_at: int = -1  # the instance count at which preparing last failed


class Outcome(StrEnum):
    """What a job found prepared ahead for it."""

    USED = "used"
    STALE = "stale"  # prepared, but for other inputs or another model: the job does the work itself
    MISSED = "missed"  # nothing prepared (prefetch off, a quiet period too short, or preparing failed)


class StudyPrefetcher:
    def __init__(
        self,
        client: OrthancClient,
        active_model: Callable[[], OnnxModel | None],
        settings: PrefetchSettings,
        on_prepared: Callable[[bool], None] = lambda _ok: None,
    ) -> None:
        self._client = client
        self._on_prepared = on_prepared
        self._active_model = active_model
        self.settings = settings
        self._studies: dict[str, _Arriving] = {}
        self._new_series: list[str] = []
        self._lock = threading.Condition()

    def close(self) -> None:
        self._client.close()

    # -- what the /changes follower tells us -----------------------------------------------------------

    def notice(self, change_type: str, resource_id: str) -> None:
        with self._lock:
            if change_type == "NewStudy":
                self._studies.setdefault(resource_id, _Arriving(time.monotonic()))
            elif change_type == "NewSeries":
                self._new_series.append(resource_id)

    def stable(self, study_id: str) -> None:
        """The study is stable: its job takes over; nothing more is prepared for it."""
        with self._lock:
            entry = self._studies.get(study_id)
            if entry is not None and entry.ready is None and not entry.preparing:
                del self._studies[study_id]

    # -- what a job asks -----------------------------------------------------------------------------

    def peek(self, study_id: str, model_key: str) -> PreparedAhead | None:
        """The study as prepared for this model, if ready (it stays here for its job to take)."""
        with self._lock:
            entry = self._studies.get(study_id)
            ready = entry.ready if entry is not None and not entry.preparing else None
        return ready if ready is not None and ready.model_key == model_key else None

    def take(
        self, study_id: str, fingerprint: str, model_key: str, wait_s: float = 30.0
    ) -> tuple[PreparedAhead | None, Outcome]:
        """The study prepared ahead for exactly these inputs and this model, if any (waiting for one being
        prepared right now); the entry is removed either way."""
        with self._lock:
            entry = self._studies.get(study_id)
            deadline = time.monotonic() + wait_s
            while entry is not None and entry.preparing and time.monotonic() < deadline:
                self._lock.wait(0.05)
            entry = self._studies.pop(study_id, None)
            ready = entry.ready if entry is not None else None
            if ready is None:
                return None, Outcome.MISSED
            if ready.prepared.loaded.fingerprint != fingerprint or ready.model_key != model_key:
                return None, Outcome.STALE
            return ready, Outcome.USED

    # -- the prefetch loop -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._resolve_series()
                for study_id in self._due():
                    self._prepare(study_id)
            except RadfedError as exc:  # Orthanc unreachable or answering errors: the jobs will cope
                logger.debug("prefetch pass skipped: %s", exc)
            stop.wait(self.settings.poll_s)

    def _resolve_series(self) -> None:
        with self._lock:
            series_ids, self._new_series = self._new_series, []
        for series_id in series_ids:
            try:
                series = self._client.series(series_id)
            except RadfedError:
                continue  # deleted meanwhile
            if str(series.get("MainDicomTags", {}).get("Modality", "")) in RESULT_MODALITIES:
                continue  # our own SEG/SR (or another derived object): the inputs did not change
            with self._lock:
                self._studies.setdefault(str(series["ParentStudy"]), _Arriving(time.monotonic()))

    def _due(self) -> list[str]:
        """Studies quiet for ``quiet_s`` whose current instances are not prepared yet."""
        now = time.monotonic()
        with self._lock:
            candidates = list(self._studies.items())
        due = []
        for study_id, entry in candidates:
            if now - entry.first_seen > self.settings.forget_after_s:
                self._drop(study_id)
                continue
            try:
                study = self._client.study(study_id)
                count = int(self._client.get_json(f"/studies/{study_id}/statistics")["CountInstances"])
            except RadfedError:
                self._drop(study_id)  # deleted (or Orthanc away): the job path handles it
                continue
            if study.get("IsStable") and entry.ready is None:
                self._drop(study_id)  # already stable (e.g. replayed changes after a restart): nothing to gain
                continue
            if count != entry.instances:
                entry.instances, entry.changed_at = count, now
                continue
            quiet = now - entry.changed_at >= self.settings.quiet_s
            prepared_for = entry.ready.instances if entry.ready is not None else entry.failed_at
            if quiet and prepared_for != count:
                due.append(study_id)
        return due

    def _prepare(self, study_id: str) -> None:
        model = self._active_model()
        with self._lock:
            entry = self._studies.get(study_id)
            if model is None or entry is None:
                return
            entry.preparing = True
            count = entry.instances
        timer = StageTimer()
        ready: PreparedAhead | None = None
        try:
            source = OrthancStudy(self._client, study_id)
            prepared = prepare_study(source, model, timer)
            ready = PreparedAhead(prepared, model.artifact.key, count, frozenset(source.series_ids), timer.as_dict())
        except Exception as exc:  # noqa: BLE001 - the study's own job will meet (and report) the problem
            logger.debug("could not prepare study %s ahead: %s", study_id, type(exc).__name__)
        with self._lock:
            entry.preparing = False
            if ready is None:
                entry.failed_at = count
            else:
                entry.ready = ready
                self._bound()
                logger.info("study %s prepared ahead (%d instances)", study_id, count)
            self._lock.notify_all()
        self._on_prepared(ready is not None)

    def _drop(self, study_id: str) -> None:
        with self._lock:
            entry = self._studies.get(study_id)
            if entry is not None and not entry.preparing:
                del self._studies[study_id]

    def _bound(self) -> None:
        ready = sorted((e.first_seen, s) for s, e in self._studies.items() if e.ready is not None)
        for _, study_id in ready[: max(0, len(ready) - self.settings.max_studies)]:
            del self._studies[study_id]
