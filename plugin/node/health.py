"""What ``/ready`` tells: each of the node's loops beats as it goes round; a loop that raised since its last
good round is *failing*, one that has not beaten for a while is *stalled*, one whose thread ended is
*stopped*. A loop busy with one study (an examination, a job) may take longer before it counts as stalled."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import StrEnum

# An idle loop beats at least every few seconds (its polling period); a minute of silence is a stall.
STALL_AFTER_S = 60.0
# A loop inside one study (inference of a large study on a slow CPU) is given longer.
BUSY_STALL_AFTER_S = 15 * 60.0
_MAX_REASON = 300


class LoopStatus(StrEnum):
    OK = "ok"
    FAILING = "failing"
    STALLED = "stalled"
    STOPPED = "stopped"


@dataclass
class _Loop:
    last_beat: float
    busy_since: float | None = None
    failures: int = 0  # consecutive, reset by a good round
    last_error: str = ""
    thread: threading.Thread | None = None
    beats: bool = True  # False: a loop that blocks inside another component (judged by its thread only)


@dataclass(frozen=True)
class LoopReport:
    name: str
    status: LoopStatus
    reason: str
    seconds_since_beat: float

    def as_dict(self) -> dict[str, object]:
        return {"status": self.status.value, "reason": self.reason, "seconds_since_beat": self.seconds_since_beat}


class LoopMonitor:
    """Thread-safe heartbeats of named loops."""

    def __init__(self, stall_after_s: float = STALL_AFTER_S, busy_stall_after_s: float = BUSY_STALL_AFTER_S) -> None:
        self._lock = threading.Lock()
        self._loops: dict[str, _Loop] = {}
        self.stall_after_s = stall_after_s
        self.busy_stall_after_s = busy_stall_after_s

    def register(self, name: str, thread: threading.Thread | None = None, *, beats: bool = True) -> None:
        with self._lock:
            self._loops[name] = _Loop(time.monotonic(), thread=thread, beats=beats)

    def beat(self, name: str) -> None:
        """A good round: the loop advanced (or waited, idle, as it should)."""
        with self._lock:
            loop = self._loops.setdefault(name, _Loop(time.monotonic()))
            loop.last_beat, loop.busy_since, loop.failures, loop.last_error = time.monotonic(), None, 0, ""

    def busy(self, name: str) -> None:
        with self._lock:
            loop = self._loops.setdefault(name, _Loop(time.monotonic()))
            loop.busy_since = time.monotonic()

    def failed(self, name: str, error: BaseException) -> None:
        with self._lock:
            loop = self._loops.setdefault(name, _Loop(time.monotonic()))
            loop.failures += 1
            loop.busy_since = None
            loop.last_error = f"{type(error).__name__}: {error}"[:_MAX_REASON]

    def report(self) -> list[LoopReport]:
        now = time.monotonic()
        reports = []
        with self._lock:
            for name, loop in sorted(self._loops.items()):
                quiet = now - loop.last_beat
                limit = self.busy_stall_after_s if loop.busy_since is not None else self.stall_after_s
                if loop.thread is not None and not loop.thread.is_alive():
                    status, reason = LoopStatus.STOPPED, "its thread has ended"
                elif loop.failures:
                    status = LoopStatus.FAILING
                    reason = f"{loop.failures} failure(s) in a row, last: {loop.last_error}"
                elif loop.beats and quiet > limit:
                    doing = "busy with one study" if loop.busy_since is not None else "idle"
                    status, reason = LoopStatus.STALLED, f"no progress for {quiet:.0f} s ({doing})"
                else:
                    status, reason = LoopStatus.OK, ""
                reports.append(LoopReport(name, status, reason, round(quiet, 1)))
        return reports
