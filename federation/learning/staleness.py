"""Late updates: a site's update that reaches the coordinator after its round closed (a straggler).

A round can close before every site has answered (run-config ``round-quorum`` / ``round-deadline``). What then
happens to the update that comes later is ``late-updates``:

- ``drop``: it is recorded (the site still spent its privacy budget on it) and left out;
- ``fold``: it joins the aggregation of the round in which it arrives, FedBuff-style (Nguyen et al., AISTATS 2022):
  the site's step (its model minus the global model it started from) is moved onto the current global model, and
  weighted by FedAsync's polynomial staleness function (Xie et al., 2019), ``examples x (1 + s) ** -a`` for a
  staleness of ``s`` rounds. Median and trimmed mean are unweighted: there the fold counts as one more site.

DP-SGD noise was added before the update left the site, so folding it is post-processing: no privacy cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import numpy as np


class LateUpdates(StrEnum):
    DROP = "drop"
    FOLD = "fold"


def staleness_weight(examples: float, staleness: int, exponent: float) -> float:
    """FedAsync's polynomial staleness weight: ``examples x (1 + staleness) ** -exponent``."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} < 0")
    return float(examples) * (1.0 + staleness) ** -exponent


def rebase(late: Sequence[np.ndarray], origin: Sequence[np.ndarray], current: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A late site model, trained from the global model ``origin``, moved onto ``current``: its own step
    (``late - origin``) counts, not the stale starting point it took that step from."""
    if not len(late) == len(origin) == len(current):
        raise ValueError(f"{len(late)} late arrays, {len(origin)} origin, {len(current)} current")
    return [
        (np.asarray(c, dtype=np.float64) + np.asarray(x, dtype=np.float64) - np.asarray(o, dtype=np.float64)).astype(
            np.asarray(c).dtype
        )
        for x, o, c in zip(late, origin, current, strict=True)
    ]
