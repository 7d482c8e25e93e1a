"""What one of the node's loops gets from the lifecycle: its name (health beats), when to stop, what wakes it."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from radfed.plugin.node.health import LoopMonitor

# Loops that poll the local ledger (cheap) wait this long at most; a wake-up event cuts the wait short.
LEDGER_POLL_S = 0.25


@dataclass(frozen=True)
class NodeLoop:
    name: str
    stop: threading.Event
    wake: threading.Event
    health: LoopMonitor

    def beat(self) -> None:
        self.health.beat(self.name)

    def busy(self) -> None:
        self.health.busy(self.name)

    def idle(self) -> None:
        """Nothing to do: report alive and wait for a wake-up or the next poll."""
        self.beat()
        self.wake.wait(LEDGER_POLL_S)
        self.wake.clear()
