"""The change follower: Orthanc's ``/changes`` from the ledger's cursor into the ledger's inbox (StableStudy), the
studies that changed without becoming stable (reconciled later), and what the prefetcher should know."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import datetime

from radfed.inference.errors import OrthancRequestError, OrthancUnavailableError, RadfedError
from radfed.inference.orthanc.client import Change, OrthancClient
from radfed.plugin.node.config import NodeConfig
from radfed.plugin.node.health import LoopMonitor
from radfed.plugin.node.ledger.store import Ledger
from radfed.plugin.node.prefetch import StudyPrefetcher

logger = logging.getLogger(__name__)

STABLE_STUDY = "StableStudy"


class ReprocessError(RadfedError, ValueError):
    """A reprocessing request that names no valid date."""


class ChangeFollower:
    """Follows ``/changes``; every StableStudy lands in the inbox exactly once per change sequence number."""

    def __init__(
        self,
        client: OrthancClient,
        ledger: Ledger,
        config: NodeConfig,
        health: LoopMonitor,
        prefetcher: StudyPrefetcher | None,
        *,
        wake_examiner: threading.Event,
        orthanc_seen: Callable[[bool], None],
        queue_changed: Callable[[], None],
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.config = config
        self.health = health
        self.prefetcher = prefetcher
        self._wake_examiner = wake_examiner
        self._orthanc_seen = orthanc_seen
        self._queue_changed = queue_changed
        self.start_from_now = False

    def skip_history(self) -> None:
        """A new (or lost) ledger beside an Orthanc with history follows from now: re-running every stored
        study is an explicit decision (``reprocess_since``), never a side effect of a missing file."""
        last = int(self.client.get_json("/changes", params={"last": ""})["Last"])
        self.ledger.set_cursor(last)
        self.start_from_now = False
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
        self._wake_examiner.set()
        logger.info("reprocessing %d stable studies since %s", len(studies), since)
        return len(studies)

    def follow(self, name: str, stop: threading.Event) -> None:
        backoff = self.config.retry_base_s
        while not stop.is_set():
            if self.start_from_now:
                with contextlib.suppress(OrthancUnavailableError):  # noticed again just below
                    self.skip_history()
            since = self.ledger.cursor()
            try:
                changes, last, done = self.client.changes(since, limit=200)
                # Orthanc may go away between the two reads: the cursor stays put and the batch is read again
                changed = self._changed_studies(changes)
            except OrthancUnavailableError:
                self._orthanc_seen(False)
                self.health.beat(name)  # waiting for Orthanc is this loop's job (readiness reports Orthanc)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.config.retry_max_s)
                continue
            self._orthanc_seen(True)
            backoff = self.config.retry_base_s
            stable = [(c.resource_id, c.seq) for c in changes if c.change_type == STABLE_STUDY]
            if self.prefetcher is not None:
                for change in changes:
                    if change.change_type == STABLE_STUDY:
                        self.prefetcher.stable(change.resource_id)
                    else:
                        self.prefetcher.notice(change.change_type, change.resource_id)
            if changes or last != since:
                self.ledger.receive(stable, cursor=last, changed=changed)
                if stable:
                    self._wake_examiner.set()
            self._queue_changed()
            self.health.beat(name)
            if done:
                stop.wait(self.config.poll_interval_s)

    def _changed_studies(self, changes: list[Change]) -> list[str]:
        """The studies a batch of changes created or added a series to (reconciled if no StableStudy follows)."""
        studies = {c.resource_id for c in changes if c.change_type == "NewStudy"}
        for change in changes:
            if change.change_type == "NewSeries":
                try:
                    studies.add(str(self.client.get_json(f"/series/{change.resource_id}")["ParentStudy"]))
                except (OrthancRequestError, KeyError, TypeError):
                    continue  # the series is gone again: nothing to reconcile
        return sorted(studies)

    def reconcile(self, name: str, stop: threading.Event) -> None:
        """Studies left without StableStudy (an Orthanc crash inside StableAge) are examined once quiet and
        stable in Orthanc's eyes; one still receiving instances waits."""
        while not stop.is_set():
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
                self._wake_examiner.set()
            self.health.beat(name)
            stop.wait(self.config.reconcile_interval_s)
