"""The ServerApp's round with many sites: each reply is folded into the streaming sum as it arrives and dropped,
and the round's model, flags and metrics equal those of the batch path. Flower's transport is replaced by a
stand-in ``exchange`` that hands the replies to the round's fold one at a time."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from radfed.federation.coordinator.checkpoint import CoordinatorCheckpoint, QuorumError
from radfed.federation.coordinator.server_app import RoundDriver
from radfed.federation.job import records
from radfed.federation.job.run_config import RunConfig
from radfed.federation.learning.aggregation import SiteUpdate, aggregate
from radfed.inference.model.recipe import Schedule, TrainingRecipe


class _Grid:
    def __init__(self, sites: int) -> None:
        self.sites = sites

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.sites + 1))


def _updates(sites: int) -> tuple[list[np.ndarray], list[SiteUpdate]]:
    rng = np.random.default_rng(3)
    base = [rng.normal(size=(64, 64, 3, 3)).astype(np.float32), rng.normal(size=(64,)).astype(np.float32)]
    shared = [rng.normal(size=b.shape) for b in base]
    updates = []
    for i in range(1, sites + 1):
        sign = -1.0 if i == 4 else 1.0  # site-04 sends its update sign-flipped
        arrays = [
            (b + 0.01 * sign * (0.55 * s + 0.84 * rng.normal(size=b.shape))).astype(np.float32)
            for b, s in zip(base, shared, strict=True)
        ]
        updates.append(SiteUpdate(f"site-{i:02d}", arrays, 2 + i % 3))
    return base, updates


def _round(
    tmp_path: Path,
    screening: str,
    sites: int,
    monkeypatch: pytest.MonkeyPatch,
    server_round: int = 1,
    recipe: TrainingRecipe | None = None,
    corrupt: frozenset[int] = frozenset(),
) -> tuple[CoordinatorCheckpoint, int]:
    base, updates = _updates(sites)
    for i in corrupt:  # a diverged site: NaN in its first array
        updates[i].arrays[0][0, 0, 0, 0] = np.nan
    held = 0  # bytes still allocated once every reply was folded in and dropped

    def exchange(
        self: RoundDriver, message_type: str, content: RecordDict, group: str, fold: Any = None, **_: Any
    ) -> Any:  # late updates and the round number (stragglers) do not arise here
        nonlocal held
        replies = {}
        tracemalloc.start()
        for node, update in enumerate(updates, 1):
            reply = RecordDict(
                {"arrays": records.pack_arrays(update.arrays), "metrics": MetricRecord({"num-examples": update.weight})}
            )
            metrics = records.metrics(reply)
            fold(update.site, metrics, reply)
            del reply
            replies[update.site] = (node, metrics, RecordDict())
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return replies, {}

    monkeypatch.setattr(RoundDriver, "exchange", exchange)
    run = RunConfig.from_run_config(
        {
            "out-dir": str(tmp_path / screening),
            "screening": screening,
            "server-learning-rate": 1.0,
            "num-server-rounds": 24,
            "local-steps": 10,
        }
    )
    job = RoundDriver(_Grid(sites), run, recipe)  # type: ignore[arg-type]
    state = CoordinatorCheckpoint(arrays=base)
    job.train_round(server_round, state)
    return state, held


def test_a_streaming_round_keeps_no_reply_and_matches_the_batch_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sites = 40  # above the exact screening's site count: auto streams
    streamed, streamed_held = _round(tmp_path, "auto", sites, monkeypatch)
    batch, batch_held = _round(tmp_path, "exact", sites, monkeypatch)
    update_bytes = 4 * (64 * 64 * 9 + 64)
    assert batch_held > 0.9 * sites * update_bytes  # the batch path holds every site's update until the round's end
    # streaming keeps a sketch per site (4096 float64) and no update
    assert streamed_held < 0.3 * batch_held, (streamed_held, batch_held)
    assert [a.site for a in streamed.flags] == [a.site for a in batch.flags] == ["site-04"]
    for s, b in zip(streamed.arrays, batch.arrays, strict=True):
        np.testing.assert_allclose(s, b, rtol=1e-6, atol=1e-7)
    base, updates = _updates(sites)
    expected = aggregate(base, updates, "fedavg", screening="exact")
    for s, e in zip(streamed.arrays, expected.arrays, strict=True):
        np.testing.assert_allclose(s, e, rtol=1e-6, atol=1e-7)
    line = json.loads((tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(line["aggregated"]) == sites - 1 and line["flagged"][0]["site"] == "site-04"
    assert line["sites"]["site-01"]["bytes_up"] == sum(a.nbytes for a in updates[0].arrays)
    assert not [p for p in (tmp_path / "auto").iterdir() if p.name.startswith("radfed-spill-")]


@pytest.mark.parametrize(("screening", "sites"), [("exact", 5), ("auto", 40)])
def test_the_schedules_decayed_tail_is_screened_by_norm_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, screening: str, sites: int
) -> None:
    """In the job's last rounds, with the cosine schedule's learning rate under 5 % of its peak, the sign-flipped
    site is aggregated (its update is as small as an honest one's) and the round's metrics say the direction rule
    was off; in round 21 of 24 it is still flagged. Both the batch and the streaming path."""
    cosine = TrainingRecipe(schedule=Schedule.COSINE)
    early, _ = _round(tmp_path / "early", screening, sites, monkeypatch, server_round=21, recipe=cosine)
    assert [a.site for a in early.flags] == ["site-04"]
    late, _ = _round(tmp_path / "late", screening, sites, monkeypatch, server_round=22, recipe=cosine)
    assert late.flags == []
    line = json.loads((tmp_path / "late" / screening / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["direction_screened"] is False and "site-04" in line["aggregated"]
    constant, _ = _round(
        tmp_path / "constant",
        screening,
        sites,
        monkeypatch,
        server_round=24,
        recipe=TrainingRecipe(schedule=Schedule.CONSTANT),
    )
    assert [a.site for a in constant.flags] == ["site-04"]  # a schedule that never decays screens every round


@pytest.mark.parametrize(("screening", "sites"), [("exact", 5), ("auto", 40)])
def test_a_diverged_sites_update_is_left_out_and_a_round_of_nothing_but_such_updates_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, screening: str, sites: int
) -> None:
    """A site whose training diverged sends NaN: flagged as not finite and left out, so the round's model stays
    finite (averaged in, one NaN would have made every weight of it NaN); when every update is so, the round fails
    with a reason instead of a numpy error."""
    state, _ = _round(tmp_path / "one", screening, sites, monkeypatch, corrupt=frozenset({1}))
    flagged = sorted((a.site, str(a.rule)) for a in state.flags)
    assert flagged == [("site-02", "update-not-finite"), ("site-04", "update-direction")]
    assert all(np.isfinite(a).all() for a in state.arrays)
    line = json.loads((tmp_path / "one" / screening / "metrics.jsonl").read_text().splitlines()[-1])
    assert "site-02" not in line["aggregated"] and len(line["aggregated"]) == sites - 2
    with pytest.raises(QuorumError, match=r"round 1: no update left to aggregate: site-01: update not finite"):
        _round(tmp_path / "all", screening, sites, monkeypatch, corrupt=frozenset(range(sites)))
