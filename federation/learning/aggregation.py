"""Aggregation of site updates at the coordinator: FedAvg and robust rules, with anomaly flags.

Updates are compared as deltas from the round's global model. A site whose delta has a norm far above
the others' (median absolute deviation) or points away from them (cosine to the mean of the others)
is flagged, named, and left out of that round, whatever the rule. Robust rules follow the literature:
coordinate-wise median and trimmed mean (Yin et al., 2018), multi-Krum (Blanchard et al., 2017).

Cost at the coordinator, for N updates of d parameters. The exact screening compares every pair of updates
(O(N^2 d) time, all N updates in memory) and so does multi-Krum (pairwise distances); the median and the trimmed
mean need all N updates at once by nature (a coordinate's median is not a running quantity). For large N the
``sketch`` screening (``Screening``) works on each update's exact norm and a count sketch of ``SKETCH_WIDTH``
numbers (Charikar, Chen & Farach-Colton 2002; inner products preserved in expectation, Weinberger et al. 2009):
cosine to the leave-one-out mean from the sketches' sum, O(N k), and the opposing-most-others test on a random
sample of ``PAIRWISE_SAMPLE`` others per update, O(N m k); multi-Krum's distances come from the sketches,
O(N^2 k) with k << d (random projections preserve distances: Johnson & Lindenstrauss 1984). With FedAvg or
multi-Krum and the sketch screening the coordinator streams (streaming.py): one model-sized sum, not N updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

Arrays = list[npt.NDArray[np.floating]]

logger = logging.getLogger(__name__)


class AggregationRule(StrEnum):
    FEDAVG = "fedavg"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed-mean"
    MULTI_KRUM = "multi-krum"


@dataclass(frozen=True)
class SiteUpdate:
    site: str
    arrays: Arrays
    weight: float  # FedAvg: the site's examples (times a staleness factor for a late update; staleness.py)


class Screening(StrEnum):
    """How the screening (and multi-Krum's distances) compare updates: ``exact`` pairwise on the full updates
    (O(N^2 d)), ``sketch`` on exact norms and count sketches (O(N d) to sketch, then O(N k)), ``auto``: exact up to
    ``EXACT_UP_TO_SITES`` updates, sketch beyond."""

    AUTO = "auto"
    EXACT = "exact"
    SKETCH = "sketch"

    def resolve(self, sites: int) -> Screening:
        if self is Screening.AUTO:
            return Screening.EXACT if sites <= EXACT_UP_TO_SITES else Screening.SKETCH
        return self


# Up to here the exact rules cost little (bench coordinator: N = 10 in about a second) and every job run so far
# (3-4 sites) keeps exactly the screening its thresholds were measured with.
EXACT_UP_TO_SITES = 32
SKETCH_WIDTH = 4096  # cosine error about 1 / sqrt(4096) = 0.016 against thresholds of -0.1 and -0.2
PAIRWISE_SAMPLE = 64  # others sampled per update: P(opposed share off by > 0.25) <= 2 exp(-2 * 64 * 0.25^2) = 7e-4


# The direction rule applies while a job's schedule keeps the learning rate at or above this share of its peak.
# Below it the sites' updates are small and their directions mostly noise: in the last round of a clean 3-site run
# (24 rounds x 10 local steps, cosine schedule; updates 1/1000 of round 1's norm, no shared direction left: the
# squared norm of their sum was 0.89 of the sum of their squared norms) an honest site opposed both others
# (-0.21, -0.21) while they agreed (0.15), just as a sign-flipped one would, and was flagged. A flipped update that
# small moves the model by no more than an honest one; a scaled one is still caught by the norm rule.
DIRECTION_MIN_LEARNING_RATE = 0.05


class AnomalyRule(StrEnum):
    """Which screening rule flagged an update (named in every site's poisoning alert)."""

    UPDATE_NORM = "update-norm"
    UPDATE_DIRECTION = "update-direction"
    UPDATE_NOT_FINITE = "update-not-finite"  # NaN or infinity: a diverged site or a corrupt update, never averaged


@dataclass(frozen=True)
class AnomalyFlag:
    site: str
    rule: AnomalyRule
    reason: str  # with the measured values: for the coordinator's log, never sent to the sites


class NothingToAggregateError(ValueError):
    """Screening left no update of the round to aggregate (each one was not finite)."""

    @classmethod
    def of(cls, flags: Sequence[AnomalyFlag]) -> NothingToAggregateError:
        reasons = "; ".join(f"{f.site}: {f.reason}" for f in sorted(flags, key=lambda f: f.site))
        return cls(f"no update left to aggregate: {reasons}")


@dataclass(frozen=True)
class AggregationOutcome:
    arrays: Arrays
    used: tuple[str, ...]
    flags: tuple[AnomalyFlag, ...]


def flatten(arrays: Sequence[npt.NDArray[np.floating]]) -> npt.NDArray[np.float64]:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def unflatten(vector: npt.NDArray[np.float64], like: Sequence[npt.NDArray[np.floating]]) -> Arrays:
    out, start = [], 0
    for array in like:
        out.append(vector[start : start + array.size].reshape(array.shape).astype(array.dtype))
        start += array.size
    return out


def detect_anomalies(
    deltas: dict[str, npt.NDArray[np.float64]],
    *,
    norm_mads: float = 6.0,
    norm_ratio: float = 5.0,
    min_cosine: float = -0.2,
    min_pairwise: float = -0.1,
    direction: bool = True,
) -> list[AnomalyFlag]:
    """Flag deltas whose norm is far above the others' or whose direction opposes the others' (``direction``
    off: the norm rule only; see ``DIRECTION_MIN_LEARNING_RATE``).

    The norm must exceed both the median + ``norm_mads`` MADs and ``norm_ratio`` x the median: with three
    sites the MAD is tiny, and an honest small site under DP-SGD sends a noisier update (measured: 3.0x the
    median for a 3-study site beside 4-study sites), which must not be thrown away.

    Direction: each update's cosine to the mean of the other (unflagged) updates. Honest sites' updates
    agree only partly (pairwise cosine 0.27-0.37 measured on the synthetic cohort, 2-30 local steps), so with
    three sites a sign-flipped one is invisible against the coordinate-wise median of all three (cosine
    -0.01 to 0.03 measured) but clear against the others' mean (about -2r / sqrt(2 + 2r), -0.4 at r = 0.3),
    while an honest site scores about 0 there (it agrees with one other and opposes the flipped one).
    Near convergence honest sites pull apart, and one large update can dominate the others' mean: in round 8
    of a clean run an honest site scored -0.32 against it only because the second site's update, 2.5x
    larger, opposed it (pairwise cosine -0.34) while the third was orthogonal to it (-0.06); it was left
    out and the global Dice fell from 0.74 (round 7) to 0.34. A flipped update opposes every honest site
    it would have agreed with, so a site is flagged only if it also opposes most of the others one by one
    (pairwise cosine below ``min_pairwise``).

    Cost: O(N^2 d) time and an (N - 1) x d temporary per update; ``detect_anomalies_sketched`` is the O(N) rule."""
    flags = _norm_flags({n: float(np.linalg.norm(d)) for n, d in deltas.items()}, norm_mads, norm_ratio)
    remaining = [n for n in deltas if n not in {f.site for f in flags}]
    if len(remaining) < 3 or not direction:
        return flags
    opposing = []
    for name in remaining:
        others = [deltas[o] for o in remaining if o != name]
        cosine = _cosine(deltas[name], np.mean(others, axis=0))
        opposed = sum(_cosine(deltas[name], other) < min_pairwise for other in others)
        if cosine < min_cosine and opposed > len(others) / 2:
            opposing.append(
                AnomalyFlag(
                    name,
                    AnomalyRule.UPDATE_DIRECTION,
                    f"update direction cosine {cosine:.2f} to the others' mean, opposing {opposed} of"
                    f" {len(others)} sites (sign-flipped?)",
                )
            )
    return flags + _minority(opposing, len(remaining))


def _minority(opposing: list[AnomalyFlag], remaining: int) -> list[AnomalyFlag]:
    """The direction rule's flags where they are a minority, else none. It screens against the direction most
    updates share: when half of them or more oppose the others there is no such direction (honest sites
    overshooting in different directions, measured on four real-brain hospitals at four times the recipe's learning
    rate, where every update was flagged and nothing was left to average), and an attack by half the
    sites or more is beyond what any screening against the majority can catch."""
    if 2 * len(opposing) < remaining:
        return opposing
    if opposing:
        logger.warning(
            "direction screening abstains: %d of %d updates oppose the others, no direction most of them share",
            len(opposing),
            remaining,
        )
    return []


def not_finite_flags(norms: dict[str, float]) -> list[AnomalyFlag]:
    """Updates with a NaN or infinity anywhere (their norm is then not finite): never averaged, screening or not."""
    return [
        AnomalyFlag(name, AnomalyRule.UPDATE_NOT_FINITE, "update not finite (NaN or infinity: diverged training?)")
        for name, norm in norms.items()
        if not math.isfinite(norm)
    ]


def _norm_flags(norms: dict[str, float], norm_mads: float, norm_ratio: float) -> list[AnomalyFlag]:
    """Updates that are not finite (a NaN or infinity anywhere makes the norm so), then the finite ones whose norm
    is far above the others'."""
    flags = not_finite_flags(norms)
    finite = {name: norm for name, norm in norms.items() if math.isfinite(norm)}
    if len(finite) < 3:
        return flags  # two updates cannot out-vote each other
    values = np.array(list(finite.values()))
    median_norm = float(np.median(values))
    mad = float(np.median(np.abs(values - median_norm))) or 1e-12
    return flags + [
        AnomalyFlag(
            name, AnomalyRule.UPDATE_NORM, f"update norm {norm:.3g} vs median {median_norm:.3g} (scaled update?)"
        )
        for name, norm in finite.items()
        if norm > max(median_norm + norm_mads * mad, norm_ratio * median_norm)
    ]


class CountSketch:
    """A linear map from d numbers to ``width`` (Charikar, Chen & Farach-Colton 2002): each coordinate is added,
    with a random sign, to one random bucket. Inner products of sketches estimate those of the vectors without
    bias, with a standard deviation about |a| |b| / sqrt(width); being linear, the sketch of a sum is the sum of
    the sketches. O(d) per vector; the same seed gives the same map."""

    def __init__(self, size: int, width: int = SKETCH_WIDTH, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.width = width
        self._buckets = rng.integers(0, width, size, dtype=np.intp)
        self._signs = rng.integers(0, 2, size).astype(np.float64) * 2 - 1

    def __call__(self, vector: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.bincount(self._buckets, weights=self._signs * vector, minlength=self.width).astype(np.float64)


def detect_anomalies_sketched(
    norms: dict[str, float],
    sketches: dict[str, npt.NDArray[np.float64]],
    *,
    norm_mads: float = 6.0,
    norm_ratio: float = 5.0,
    min_cosine: float = -0.2,
    min_pairwise: float = -0.1,
    sample: int = PAIRWISE_SAMPLE,
    seed: int = 0,
    direction: bool = True,
) -> list[AnomalyFlag]:
    """``detect_anomalies``' rules in O(N) for many sites, from each update's exact norm and its count sketch.

    The norm rule is the same. The cosine to the mean of the other unflagged updates comes from the sketches'
    sum minus the update's own (the leave-one-out mean; O(N k)). "Opposes most of the others one by one" is
    estimated on ``sample`` others drawn at random for each update (all of them when there are fewer): a Monte
    Carlo estimate of the same share, so a flipped update that opposes nearly every honest one, and an honest
    one that opposes few, land on the sides of one half they land on with every pair (Hoeffding: the share is off
    by more than 0.25 with probability below 2 exp(-2 m 0.25^2), 7e-4 at m = 64). The same seed draws the same
    sample. Cosines from sketches of ``SKETCH_WIDTH`` numbers are off by about 0.016."""
    flags = _norm_flags(norms, norm_mads, norm_ratio)
    flagged = {f.site for f in flags}
    remaining = [n for n in norms if n not in flagged]
    if len(remaining) < 3 or not direction:
        return flags
    points = np.stack([sketches[n] for n in remaining])
    lengths = np.linalg.norm(points, axis=1)
    total = points.sum(axis=0)
    others = total[None, :] - points  # each update's leave-one-out sum (a scaled mean)
    cosines = np.einsum("ij,ij->i", points, others) / np.maximum(lengths * np.linalg.norm(others, axis=1), 1e-12)
    rng = np.random.default_rng(seed)
    n = len(remaining)
    drawn = min(sample, n - 1)
    opposing = []
    for i, name in enumerate(remaining):
        if cosines[i] >= min_cosine:
            continue  # the pairwise test only confirms a low cosine to the others' mean
        picks = rng.choice(n - 1, drawn, replace=False) if drawn < n - 1 else np.arange(n - 1)
        picks = picks + (picks >= i)  # skip the update itself
        pairwise = points[picks] @ points[i] / np.maximum(lengths[picks] * lengths[i], 1e-12)
        opposed = int((pairwise < min_pairwise).sum())
        if opposed > drawn / 2:
            opposing.append(
                AnomalyFlag(
                    name,
                    AnomalyRule.UPDATE_DIRECTION,
                    f"update direction cosine {cosines[i]:.2f} to the others' mean (sketched), opposing {opposed} of"
                    f" {drawn} sampled sites (sign-flipped?)",
                )
            )
    return flags + _minority(opposing, n)


def krum_choice(distances: npt.NDArray[np.float64], krum_f: int) -> npt.NDArray[np.intp]:
    """Multi-Krum (Blanchard et al., 2017) from squared pairwise distances: score each point by its distances to
    its n - f - 2 nearest others, keep the n - f best (their indices, best first)."""
    n = len(distances)
    neighbours = max(1, n - krum_f - 2)
    scores = np.array([np.sort(np.delete(distances[i], i))[:neighbours].sum() for i in range(n)])
    return np.argsort(scores, kind="stable")[: max(1, n - krum_f)]


def sketch_distances(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Squared distances between sketches from their Gram matrix: O(N^2 k), N x N memory."""
    lengths = np.einsum("ij,ij->i", points, points)
    return np.maximum(lengths[:, None] + lengths[None, :] - 2.0 * (points @ points.T), 0.0)


def _cosine(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    return float(a @ b) / (float(np.linalg.norm(a) * np.linalg.norm(b)) or 1e-12)


def aggregate(
    global_arrays: Arrays,
    updates: Sequence[SiteUpdate],
    rule: AggregationRule | str = AggregationRule.FEDAVG,
    *,
    trim: float = 0.2,
    krum_f: int = 1,
    screen: bool = True,
    screening: Screening | str = Screening.AUTO,
    screen_direction: bool = True,
) -> AggregationOutcome:
    """The next global model from the sites' updates (anomalous ones excluded unless ``screen`` is off, which only
    the poisoning experiment does, to show what unscreened FedAvg would do, though a non-finite update is left out
    even then; ``screen_direction`` off keeps the norm rule only, for a round whose learning rate the schedule has
    decayed: ``direction_screened``).

    Holds every update (N x d float64): streaming.StreamingAggregator is the bounded-memory path for FedAvg
    and multi-Krum. ``screening`` chooses the exact O(N^2 d) comparisons or the sketched ones (see ``Screening``)."""
    rule = AggregationRule(rule)
    if not updates:
        raise ValueError("no site update to aggregate")
    sketched = Screening(screening).resolve(len(updates)) is Screening.SKETCH
    base = flatten(global_arrays)
    deltas = {u.site: flatten(u.arrays) - base for u in updates}
    sketch = CountSketch(base.size) if sketched else None
    sketches = {site: sketch(delta) for site, delta in deltas.items()} if sketch is not None else {}
    norms = {s: float(np.linalg.norm(d)) for s, d in deltas.items()}
    if not screen:
        flags = not_finite_flags(norms)
    elif sketched:
        flags = detect_anomalies_sketched(norms, sketches, direction=screen_direction)
    else:
        flags = detect_anomalies(deltas, direction=screen_direction)
    flagged = {f.site for f in flags}
    kept = [u for u in updates if u.site not in flagged]
    if not kept:
        raise NothingToAggregateError.of(flags)
    stacked = np.stack([deltas[u.site] for u in kept])
    if rule is AggregationRule.FEDAVG:
        weights = np.array([u.weight for u in kept], dtype=np.float64)
        step = weights @ stacked / weights.sum()
    elif rule is AggregationRule.MEDIAN:
        step = np.median(stacked, axis=0)
    elif rule is AggregationRule.TRIMMED_MEAN:
        cut = int(np.floor(trim * len(kept)))
        ordered = np.sort(stacked, axis=0)
        step = ordered[cut : len(kept) - cut].mean(axis=0) if len(kept) > 2 * cut else np.median(stacked, axis=0)
    else:
        if sketched:
            distances = sketch_distances(np.stack([sketches[u.site] for u in kept]))
        else:  # row by row: the same sums as broadcasting, without its N x N x d temporary (155 GB for
            # N = 100 updates of the default 1.94 M-parameter network)
            distances = np.stack([((stacked - row) ** 2).sum(axis=-1) for row in stacked])
        step = stacked[krum_choice(distances, krum_f)].mean(axis=0)
    return AggregationOutcome(unflatten(base + step, global_arrays), tuple(u.site for u in kept), tuple(flags))


# The job's default server learning rate: 1, plain FedAvg. Averaging partly agreeing updates shrinks the step, and
# a step of 2 made up for it on short runs from random weights (synthetic sites, 240 steps: Dice 0.712 against 0.593
# at 10 local steps, 4 seeds; 0.758 against 0.686 at 30, 8 seeds). On the real brain folds, trained to the end of
# their schedule at a real job's 10 local steps, plain FedAvg led in every fold measured, with a fraction of the
# false positives (README, Segmentation quality). Server step sizes above 1: Reddi et al. 2021 (arXiv:2003.00295),
# Jhunjhunwala et al. 2023 (arXiv:2301.09604).
DEFAULT_SERVER_LEARNING_RATE = 1.0


class ServerRule(StrEnum):
    """How the coordinator turns the sites' mean update into the global model's step (run-config server-optimizer)."""

    SGD = "sgd"  # learning rate x the mean update, with momentum FedAvgM; learning rate 1, no momentum: FedAvg
    ADAM = "adam"  # FedAdam (Reddi et al., ICLR 2021, arXiv:2003.00295): a per-coordinate adaptive step
    YOGI = "yogi"  # FedYogi (the same paper): Adam whose second moment grows additively, not multiplicatively


# FedAdam / FedYogi's moment decays and adaptivity floor, the paper's defaults (Reddi et al. 2021, section 5).
ADAPTIVE_BETA1 = 0.9
ADAPTIVE_BETA2 = 0.99
ADAPTIVE_TAU = 1e-3


@dataclass(frozen=True)
class ServerOptimizer:
    """How the coordinator applies the aggregated step (pseudo-gradient: aggregated - global) to the global model.

    ``sgd``: global + learning rate x step. With ``momentum`` > 0 this is FedAvgM (Hsu, Qi & Brown, 2019,
    arXiv:1909.06335): the step is accumulated in a velocity that carries over rounds, which speeds up directions the
    sites agree on round after round; with momentum 0 and learning rate 1 it is plain FedAvg (the aggregated model
    as is). ``adam`` / ``yogi``: FedAdam / FedYogi, whose state is the step's first and second moments per
    coordinate; each coordinate then moves by about ``learning_rate`` where the sites' rounds agree on its sign and
    by less where they do not, however much the average shrank the step. Their learning rate is that absolute
    step per coordinate (the paper's best lay between 10^-2.5 and 10^-1), never FedAvg's 1."""

    learning_rate: float = 1.0
    momentum: float = 0.0
    rule: ServerRule = ServerRule.SGD

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0 or self.learning_rate <= 0.0:
            raise ValueError(f"server momentum must be in [0, 1) and its learning rate > 0, got {self}")
        if self.rule is not ServerRule.SGD and (self.momentum > 0 or self.learning_rate >= 1.0):
            raise ValueError(
                f"server optimiser {self.rule}: its learning rate is a step per coordinate (e.g. 0.01), under 1, "
                f"and it has its own momentum (server momentum must be 0), got {self}"
            )

    def step(self, global_arrays: Arrays, aggregated: Arrays, state: Arrays | None) -> tuple[Arrays, Arrays | None]:
        """The next global model and the state to keep for the next round (checkpointed with the job): sgd's
        velocity (None without momentum), or adam / yogi's first moments, their second moments and the round count
        (one more array)."""
        if self.rule is ServerRule.SGD and self.momentum == 0 and self.learning_rate == 1:
            return aggregated, None  # plain FedAvg: the aggregated model as is
        deltas = [
            np.asarray(a, np.float64) - np.asarray(g, np.float64)
            for g, a in zip(global_arrays, aggregated, strict=True)
        ]
        if self.rule is not ServerRule.SGD:
            return self._adaptive(global_arrays, deltas, state)
        if state is not None and self.momentum > 0:
            deltas = [self.momentum * np.asarray(v, np.float64) + d for v, d in zip(state, deltas, strict=True)]
        updated = [
            (np.asarray(g, np.float64) + self.learning_rate * d).astype(g.dtype)
            for g, d in zip(global_arrays, deltas, strict=True)
        ]
        return updated, [d.astype(np.float32) for d in deltas] if self.momentum > 0 else None

    def _adaptive(
        self, global_arrays: Arrays, deltas: list[npt.NDArray[np.float64]], state: Arrays | None
    ) -> tuple[Arrays, Arrays]:
        """FedAdam / FedYogi (the paper's Algorithm 2, moments from 0 and tau^2) with Adam's bias correction, so
        a coordinate whose step keeps its sign moves by about learning_rate from round 1 on; tau is the floor
        below which a coordinate's step counts as noise (moves much less than learning_rate)."""
        count = len(deltas)
        if state is None:
            first = [np.zeros_like(d) for d in deltas]
            second = [np.full_like(d, ADAPTIVE_TAU**2) for d in deltas]
            rounds = 0
        elif len(state) != 2 * count + 1:
            raise ValueError(f"server optimiser {self.rule}: {len(state)} state arrays for {count} weights")
        else:
            first = [np.asarray(m, np.float64) for m in state[:count]]
            second = [np.asarray(v, np.float64) for v in state[count : 2 * count]]
            rounds = int(state[-1][0])
        rounds += 1
        first = [ADAPTIVE_BETA1 * m + (1 - ADAPTIVE_BETA1) * d for m, d in zip(first, deltas, strict=True)]
        if self.rule is ServerRule.ADAM:
            second = [ADAPTIVE_BETA2 * v + (1 - ADAPTIVE_BETA2) * d**2 for v, d in zip(second, deltas, strict=True)]
        else:  # Yogi: v moves towards step^2 by at most (1 - beta2) step^2 per round, up or down
            second = [v - (1 - ADAPTIVE_BETA2) * d**2 * np.sign(v - d**2) for v, d in zip(second, deltas, strict=True)]
        rate = self.learning_rate * math.sqrt(1 - ADAPTIVE_BETA2**rounds) / (1 - ADAPTIVE_BETA1**rounds)
        updated = [
            (np.asarray(g, np.float64) + rate * m / (np.sqrt(v) + ADAPTIVE_TAU)).astype(g.dtype)
            for g, m, v in zip(global_arrays, first, second, strict=True)
        ]
        moments = [m.astype(np.float32) for m in first] + [v.astype(np.float32) for v in second]
        return updated, [*moments, np.array([rounds], np.float32)]
