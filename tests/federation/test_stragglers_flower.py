"""Stragglers on real Flower processes (issue 19 item 5): three hospitals, a round deadline, late updates folded.
Hospital-3 holds its round-1 update (the test ClientApp waits for a file) until round 2 has closed, so the job
cannot wait for it: round 1 closes at the deadline with the other two, hospital-3 is not asked again while it
trains, and its round-1 update, when it comes, is folded into the round it arrives in with the staleness weight,
rebased onto that round's global model. The job then goes on with all three. (``round-quorum`` closes rounds
through the same code: a run with quorum 2 instead of the deadline folded hospital-3's update in round 3.)"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from radfed.federation.coordinator.checkpoint import read_metrics
from radfed.federation.lab.loopback import FederationOptions, LoopbackFederation
from radfed.federation.learning.staleness import staleness_weight
from tests.federation.flower_apps import plumbing_task, recording_app

pytestmark = [pytest.mark.orthanc, pytest.mark.flower]

ROOT = Path(__file__).resolve().parents[2]
ROUNDS, EXPONENT, DEADLINE_S = 8, 0.5, 6.0


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s")


def test_a_straggler_is_not_waited_for_and_its_late_update_is_folded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the SuperNodes import the test ClientApp (what PYTHONPATH held stays behind it)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    gate = tmp_path / "release-hospital-3"
    federation = LoopbackFederation(
        tmp_path / "fed",
        recording_app(tmp_path),
        FederationOptions(sites=3, studies_per_site=4, seed=3, small=True, secure=False),
        node_config_extra={"hospital-3": f"hold-round-1='{gate}'"},
    )
    federation.start()
    out = tmp_path / "job"
    try:
        job = federation.submit(
            out,
            {
                "num-server-rounds": ROUNDS,
                "local-steps": 1,
                "min-sites": 2,
                "round-deadline": DEADLINE_S,
                "late-updates": "fold",
                "staleness-exponent": EXPONENT,
                "epsilon": 0.0,
                "harmonise": False,
                "rollout": False,
                "membership-audit": "off",
                "round-timeout": 300,
                "job": "stragglers",
                "task": str(plumbing_task(tmp_path)),
            },
        )
        rounds_done = lambda: {m.get("round") for m in read_metrics(out)}  # noqa: E731
        _wait(lambda: 2 in rounds_done(), 600, "round 2")
        gate.touch()  # hospital-3's round-1 update may go now: round 2 has closed without it
        assert job.wait(timeout=900) == 0, (out / "run.log").read_text()[-3000:]
    finally:
        federation.stop()

    rounds = [m for m in read_metrics(out) if "round" in m]
    assert [m["round"] for m in rounds] == list(range(1, ROUNDS + 1))
    first = rounds[0]
    assert sorted(first["aggregated"]) == ["hospital-1", "hospital-2"]  # closed at the deadline, not waited for
    assert DEADLINE_S <= first["seconds"] < 120  # hospital-3 was held far longer (until round 2 had closed)
    assert len(first["stragglers"]) == 1 and not first["errors"], first
    # Every late update is folded into the round it arrives in, with its staleness weight. A site slower than the
    # deadline in a later round is a straggler too, so later rounds may have their own late updates.
    late_lines = [(line, late) for line in rounds for late in line["late"]]
    for line, late in late_lines:
        assert late["action"] == "folded" and late["staleness"] == line["round"] - late["origin_round"] >= 1
        assert late["weight"] == pytest.approx(staleness_weight(late["examples"], late["staleness"], EXPONENT))
        assert late["site"] in line["aggregated"] and late["site"] not in line["sites"]  # folded, not asked again
    for line in rounds:
        arrived_later = [late for _, late in late_lines if late["origin_round"] == line["round"]]
        assert len(arrived_later) <= len(line["stragglers"])  # only a straggler's update comes late
    (line, late), *_ = [(line, late) for line, late in late_lines if late["origin_round"] == 1]
    arrived = line["round"]
    assert late["site"] == "hospital-3" and arrived >= 3  # held until round 2 had closed
    assert late["staleness"] == arrived - 1
    for between in rounds[1 : arrived - 1]:
        assert "hospital-3" not in between["sites"], between  # busy with round 1: never sent another round
    counts = [m["sites"]["hospital-3"]["num-examples"] for m in rounds if "hospital-3" in m["sites"]]
    assert all(n == late["examples"] for n in counts) and late["examples"] >= 1

    # what hospital-3 answered: each round it was asked, in time or late (one may still have been under way when
    # the job ended)
    site = next(s for s in federation.sites if s.name == "hospital-3")
    sent = [json.loads(x) for x in (site.state_dir / "sent.jsonl").read_text().splitlines()]
    trained = sum(1 for r in sent if r["type"] == "train")
    in_time = sum(1 for m in rounds if "hospital-3" in m["sites"])
    late_count = sum(1 for _, late in late_lines if late["site"] == "hospital-3")
    assert in_time + late_count <= trained <= in_time + late_count + 1
    final = next(m for m in read_metrics(out) if m.get("stage") == "final")
    # every site answered the final evaluation (one holding out a single study names itself instead of its figures)
    evaluated = set(final["evaluation"]["sites"]) | set(final["evaluation"]["withheld"])
    assert evaluated == {"hospital-1", "hospital-2", "hospital-3"} and "hospital-3" in final["evaluation"]["sites"]
    never = {entry.split(" ")[0] for entry in final["late_never_aggregated"]}
    assert never >= set(rounds[-1]["stragglers"])  # the last round's stragglers had no later round to join
