"""Per-stage wall-clock timings of a job (fetch, load, preprocess, model, postprocess, encode, QA, store)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """Accumulates seconds per named stage; stages may repeat (their times add up)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - started

    def as_dict(self) -> dict[str, float]:
        return {name: round(seconds, 4) for name, seconds in self._seconds.items()}

    @property
    def total(self) -> float:
        return sum(self._seconds.values())
