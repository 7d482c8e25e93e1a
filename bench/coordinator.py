"""The coordinator's cost per round for N site updates of the default network's size: aggregation + screening
seconds and peak traced memory (tracemalloc: every numpy buffer, including the updates the coordinator holds),
today's batch rules with the exact pairwise screening beside the streaming / sketched ones, in one run.

    python -m bench coordinator
    RADFED_BENCH_COORDINATOR_SITES=10,100 RADFED_BENCH_COORDINATOR_MAX_GB=4 python -m bench coordinator
    RADFED_BENCH_COORDINATOR_PATHS=streaming python -m bench coordinator   # only the streaming arms

The network is the default task's planned one (planned from a small synthetic cohort, as a job plans it). Updates
are synthetic: a shared direction plus each site's own (pairwise cosine about 0.3, as measured on real updates),
site-0002 sign-flipped and site-0005 scaled x20. A batch arm whose projected memory exceeds
RADFED_BENCH_COORDINATOR_MAX_GB (default 8) is skipped and its projection printed.
"""

from __future__ import annotations

import os
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.report import table

COMMAND = "python -m bench coordinator"
STEP = 0.01  # size of a synthetic update per parameter
POOL = 8


@dataclass(frozen=True)
class Arm:
    rule: str
    streaming: bool
    screening: str  # exact | sketch

    @property
    def name(self) -> str:
        return f"{'streaming' if self.streaming else 'batch'}, {self.screening} screening"

    def batch_bytes(self, sites: int, size: int) -> int:
        """What the batch path holds at its peak: the updates (float32), their float64 deltas, the stacked
        copy, and the exact screening's (N - 1) x d temporary per update."""
        return sites * size * (4 + 8 + 8 + (8 if self.screening == "exact" else 0))


ARMS = (
    Arm("fedavg", streaming=False, screening="exact"),  # today's default at any N
    Arm("fedavg", streaming=True, screening="sketch"),
    Arm("multi-krum", streaming=False, screening="exact"),
    Arm("multi-krum", streaming=True, screening="sketch"),
    Arm("median", streaming=False, screening="sketch"),  # cannot stream
)


def default_shapes() -> list[tuple[int, ...]]:
    """The array shapes of the default task's network as a job plans it (private job, from a synthetic cohort)."""
    import torch

    from radfed.federation.job.planning import job_plan
    from radfed.federation.learning.cohort import source_fingerprints
    from radfed.federation.learning.training import new_model
    from radfed.inference.model.plan import DatasetFingerprint
    from radfed.inference.model.taskspec import load_task_spec
    from radfed.inference.testing.synthetic.writer import synthesize_to_folder

    torch.set_num_threads(1)
    spec = load_task_spec()
    with tempfile.TemporaryDirectory() as tmp:
        (site,) = synthesize_to_folder(Path(tmp), sites=1, studies_per_site=3, seed=5, small=True)
        prints = {"site": DatasetFingerprint.from_studies(source_fingerprints(spec, [str(site)], None))}
    plan = job_plan(spec, prints, private=True)
    return [tuple(t.shape) for t in new_model(spec.planned(plan), seed=0).state_dict().values()]


class Updates:
    """Synthetic site models, made one at a time (a shared direction plus each site's own)."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.shapes = shapes
        self.size = int(sum(np.prod(s) for s in shapes))
        self.base = self.split(rng.standard_normal(self.size, dtype=np.float32))
        self.shared = rng.standard_normal(self.size, dtype=np.float32)
        # each site's own direction: a rolled copy of one of a few random vectors (drawing 1.94 M normals per
        # site would cost the bench more than the coordinator's work it measures); rolls are nearly orthogonal
        self.pool = [rng.standard_normal(self.size, dtype=np.float32) for _ in range(POOL)]

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for shape in self.shapes:
            n = int(np.prod(shape))
            out.append(flat[start : start + n].reshape(shape))
            start += n
        return out

    def __call__(self, sites: int) -> Iterator[tuple[str, list[np.ndarray], int]]:
        from radfed.federation.learning.aggregation import flatten

        base = flatten(self.base).astype(np.float32)
        for i in range(1, sites + 1):
            own = np.roll(self.pool[i % POOL], 7919 * (i // POOL))
            delta = STEP * (0.55 * self.shared + 0.84 * own)
            if i == 2:
                delta = -delta
            elif i == 5:
                delta = 20 * delta
            yield f"site-{i:04d}", self.split(base + delta), 10 + i % 7


@dataclass
class Clock:
    """Wall and CPU seconds (this process's, user + system: on a shared machine the wall time also counts the
    time other processes held the cores)."""

    wall: float = 0.0
    cpu: float = 0.0

    def __enter__(self) -> Clock:
        self._started = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *_: object) -> None:
        self.wall += time.perf_counter() - self._started[0]
        self.cpu += time.process_time() - self._started[1]


def run_arm(arm: Arm, updates: Updates, sites: int) -> tuple[Clock, int, list[str], list[np.ndarray]]:
    """Time in aggregation + screening, peak traced bytes (from the first update received), flags, result."""
    from radfed.federation.learning.aggregation import SiteUpdate, aggregate
    from radfed.federation.learning.streaming import StreamingAggregator

    tracemalloc.start()
    clock = Clock()
    if arm.streaming:
        with StreamingAggregator(updates.base, arm.rule) as stream:
            for site, arrays, weight in updates(sites):
                with clock:
                    stream.add(SiteUpdate(site, arrays, weight))
                del arrays  # the ServerApp drops the reply here
            with clock:
                outcome = stream.outcome()
    else:
        held = [SiteUpdate(site, arrays, weight) for site, arrays, weight in updates(sites)]
        with clock:
            outcome = aggregate(updates.base, held, arm.rule, screening=arm.screening)
        del held
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return clock, peak, sorted(f.site for f in outcome.flags), outcome.arrays


def main() -> None:
    from radfed.federation.learning.aggregation import flatten

    sites_list = [int(n) for n in os.environ.get("RADFED_BENCH_COORDINATOR_SITES", "10,100,1000").split(",")]
    max_bytes = float(os.environ.get("RADFED_BENCH_COORDINATOR_MAX_GB", "8")) * 2**30
    paths = os.environ.get("RADFED_BENCH_COORDINATOR_PATHS", "batch,streaming").split(",")
    shapes = default_shapes()
    updates = Updates(shapes)
    print(f"default network: {len(shapes)} arrays, {updates.size / 1e6:.2f} M parameters", flush=True)
    rows = []
    for sites in sites_list:
        reference: dict[str, np.ndarray] = {}
        for arm in (a for a in ARMS if ("streaming" if a.streaming else "batch") in paths):
            label = [sites, arm.rule, arm.name]
            if not arm.streaming and arm.batch_bytes(sites, updates.size) > max_bytes:
                projected = arm.batch_bytes(sites, updates.size) / 2**30
                rows.append([*label, "-", "-", f"skipped: needs ~{projected:.0f} GiB", "-", "-"])
                continue
            clock, peak, flags, arrays = run_arm(arm, updates, sites)
            result = flatten(arrays)
            if arm.rule not in reference:
                reference[arm.rule] = result
                difference = "-"
            else:
                difference = f"{float(np.abs(result - reference[arm.rule]).max()):.1e}"
            rows.append(
                [*label, f"{clock.cpu:.2f}", f"{clock.wall:.2f}", f"{peak / 2**20:.0f}", ",".join(flags) or "none"]
                + [difference]
            )
            print(f"  {rows[-1]}", flush=True)
    table(
        f"Coordinator: aggregation + screening per round ({updates.size / 1e6:.2f} M-parameter default network)",
        ["N", "rule", "path", "CPU s", "wall s", "peak MiB", "flagged", "max |diff| vs batch"],
        rows,
        COMMAND,
    )
