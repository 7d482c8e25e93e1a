"""The SuperNode wrapper's intervals (federation/site/supernode.py): Flower's idle sleep becomes the setting, its local
waits 0.05 s, every other sleep is left alone; the heartbeat interval is declared and paced as set; the pinned flwr
still holds what the wrapper changes. The Flower tests run every SuperNode through the wrapper (the loopback
federation's ``idle_pull_s`` and ``heartbeat_s``; the killed hospital of test_federation_local is found by its missed
heartbeats)."""

from __future__ import annotations

import inspect
import time
import types

import pytest
from flwr.supercore import heartbeat
from flwr.supernode import fleet_http_connection, start_client_internal

from radfed.federation.site import supernode


class Clock:
    """Stands in for ``time``: records the sleeps asked of it."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def monotonic(self) -> float:
        return 42.0


def test_the_idle_sleep_becomes_the_setting_and_only_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(supernode, "time", clock)
    loop = types.ModuleType("loop")
    loop.time = clock  # type: ignore[attr-defined]
    assert supernode.set_intervals(loop, 0.25)
    for seconds in (3, 0.5, 2.0, 0.1):
        loop.time.sleep(seconds)  # type: ignore[attr-defined]
    assert clock.slept == [0.25, supernode.LOCAL_WAIT_S, 2.0, 0.1]
    assert loop.time.monotonic() == 42.0  # type: ignore[attr-defined]  # the rest of ``time`` passes through


def test_a_loop_that_does_not_sleep_through_time_is_left_alone() -> None:
    loop = types.ModuleType("loop")
    loop.sleep = time.sleep  # type: ignore[attr-defined]  # ``from time import sleep``: nothing to reach
    assert not supernode.set_intervals(loop, 0.25)
    assert not hasattr(loop, "time")


def test_the_pinned_flower_sleeps_where_the_wrapper_expects(monkeypatch: pytest.MonkeyPatch) -> None:
    source = inspect.getsource(start_client_internal)
    assert f"time.sleep({supernode.FLOWER_IDLE_PULL_S:g})" in source
    assert f"time.sleep({supernode.FLOWER_LOCAL_WAIT_S:g})" in source
    monkeypatch.setattr(start_client_internal, "time", time)  # restored after the test
    assert supernode.set_intervals(start_client_internal, 0.5)
    assert start_client_internal.time.idle_pull_s == 0.5  # type: ignore[attr-defined]


def test_the_heartbeat_is_set_in_every_module_or_in_none() -> None:
    declares, paces = types.ModuleType("declares"), types.ModuleType("paces")
    declares.HEARTBEAT_DEFAULT_INTERVAL = paces.HEARTBEAT_DEFAULT_INTERVAL = 30  # type: ignore[attr-defined]
    assert supernode.set_heartbeat([declares, paces], 10)
    assert declares.HEARTBEAT_DEFAULT_INTERVAL == paces.HEARTBEAT_DEFAULT_INTERVAL == 10  # type: ignore[attr-defined]
    other = types.ModuleType("other")  # a version that names it otherwise: nothing is half-changed
    fresh = types.ModuleType("fresh")
    fresh.HEARTBEAT_DEFAULT_INTERVAL = 30  # type: ignore[attr-defined]
    assert not supernode.set_heartbeat([fresh, other], 10)
    assert fresh.HEARTBEAT_DEFAULT_INTERVAL == 30  # type: ignore[attr-defined]


def test_the_pinned_flower_holds_the_heartbeat_default_where_the_wrapper_sets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    modules = [fleet_http_connection, heartbeat]
    for module in modules:
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)  # restored after
    assert supernode.set_heartbeat(modules, 10)
    assert all(m.HEARTBEAT_DEFAULT_INTERVAL == 10 for m in modules)


@pytest.mark.parametrize("args", [["--idle-pull-s", "0"], ["--heartbeat-s", "5"], ["--heartbeat-s", "3600"]])
def test_the_command_refuses_intervals_flower_cannot_take(args: list[str]) -> None:
    with pytest.raises(SystemExit):
        supernode.main([*args, "--", "--insecure"])
