"""Aggregation that folds each site's update in as it arrives: one model-sized sum instead of N updates.

FedAvg is a weighted sum, so it streams exactly; multi-Krum averages all updates but the few it rejects, so it
streams too, as the sum minus those few. Screening needs every update's norm and direction: each update leaves
its exact norm and a count sketch (aggregation.CountSketch, ``SKETCH_WIDTH`` numbers) behind, and the sketched
screening and Krum distances work on those (aggregation.detect_anomalies_sketched). A flagged or rejected update
must come back out of the sum exactly, so each one is also written, once, to a spill folder on disk (N x model
bytes of disk for the round, deleted with the aggregator; only the excluded ones are read back). Without
screening, FedAvg writes nothing.

What does not stream: the coordinate-wise median and trimmed mean (a coordinate's median needs every update's
value; a bounded-memory quantile sketch per coordinate would cost more than the updates themselves), and the
exact pairwise screening: those keep ``aggregation.aggregate`` and all N updates in memory.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from radfed.federation.learning.aggregation import (
    AggregationOutcome,
    AggregationRule,
    AnomalyFlag,
    Arrays,
    CountSketch,
    NothingToAggregateError,
    Screening,
    SiteUpdate,
    detect_anomalies_sketched,
    flatten,
    krum_choice,
    not_finite_flags,
    sketch_distances,
    unflatten,
)


class StreamingAggregator:
    """FedAvg or multi-Krum over updates added one at a time; memory O(d + N k) whatever N.

    Use as a context manager (the spill folder is removed on exit). ``add`` each update as it arrives, then
    ``outcome`` once. Equals ``aggregate(..., screening="sketch")`` to float rounding (the sum's order differs)."""

    def __init__(
        self,
        global_arrays: Arrays,
        rule: AggregationRule | str = AggregationRule.FEDAVG,
        *,
        screen: bool = True,
        screen_direction: bool = True,
        krum_f: int = 1,
        spill_root: Path | None = None,
    ) -> None:
        self.rule = AggregationRule(rule)
        if not self.streams(self.rule, Screening.SKETCH):
            raise ValueError(f"aggregation {self.rule} needs every update at once; use aggregate()")
        self._like = global_arrays
        self._base = flatten(global_arrays)
        self._screen = screen
        self._screen_direction = screen_direction
        self._krum_f = krum_f
        self._sketch = CountSketch(self._base.size)
        self._sum = np.zeros_like(self._base)  # weighted (FedAvg) or plain (multi-Krum)
        self._weights: dict[str, float] = {}
        self._norms: dict[str, float] = {}
        self._sketches: dict[str, npt.NDArray[np.float64]] = {}
        self._unsummed: set[str] = set()  # not finite: never added to the sum
        self._files: dict[str, Path] = {}  # by arrival number: a site's name need not be a file name
        spills = screen or self.rule is AggregationRule.MULTI_KRUM
        self._spill = tempfile.TemporaryDirectory(prefix="radfed-spill-", dir=spill_root) if spills else None

    @staticmethod
    def streams(rule: AggregationRule | str, screening: Screening) -> bool:
        """Whether this rule with this (resolved) screening can fold updates in one at a time."""
        rule = AggregationRule(rule)
        return rule in (AggregationRule.FEDAVG, AggregationRule.MULTI_KRUM) and screening is Screening.SKETCH

    def __enter__(self) -> StreamingAggregator:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._spill is not None:
            self._spill.cleanup()

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._norms)

    def add(self, update: SiteUpdate) -> None:
        """Fold one update in; the caller may drop it afterwards. A site is added at most once."""
        if update.site in self._norms:
            raise ValueError(f"site {update.site} already added this round")
        delta = self._delta(update.arrays)
        weight = float(update.weight) if self.rule is AggregationRule.FEDAVG else 1.0
        norm = float(np.linalg.norm(delta))
        self._weights[update.site] = weight
        self._norms[update.site] = norm
        if not math.isfinite(norm):  # screened out as not finite; in the sum it would stay there (NaN - NaN)
            self._unsummed.add(update.site)
            return
        self._sum += weight * delta
        self._sketches[update.site] = self._sketch(delta)
        if self._spill is not None:
            self._files[update.site] = Path(self._spill.name) / f"{len(self._files)}.npz"
            np.savez(self._files[update.site], *update.arrays)

    def outcome(self) -> AggregationOutcome:
        """The aggregated model: screening on norms and sketches, then the sum less every excluded update."""
        if not self._norms:
            raise ValueError("no site update to aggregate")
        flags: list[AnomalyFlag] = (
            detect_anomalies_sketched(self._norms, self._sketches, direction=self._screen_direction)
            if self._screen
            else not_finite_flags(self._norms)
        )
        flagged = {f.site for f in flags}
        kept = [s for s in self._norms if s not in flagged]
        if not kept:
            raise NothingToAggregateError.of(flags)
        excluded = flagged - self._unsummed
        if self.rule is AggregationRule.MULTI_KRUM:
            chosen = krum_choice(sketch_distances(np.stack([self._sketches[s] for s in kept])), self._krum_f)
            excluded |= set(kept) - {kept[i] for i in chosen}
        total = self._sum.copy()
        for site in sorted(excluded):  # read back from disk, one at a time
            with np.load(self._files[site]) as saved:
                total -= self._weights[site] * self._delta([saved[f"arr_{i}"] for i in range(len(saved.files))])
        step = total / sum(w for s, w in self._weights.items() if s not in excluded | self._unsummed)
        return AggregationOutcome(unflatten(self._base + step, self._like), tuple(sorted(kept)), tuple(flags))

    def _delta(self, arrays: Arrays) -> npt.NDArray[np.float64]:
        return flatten(arrays) - self._base
