"""Flower's SuperNode (``flower-supernode``) with its idle pull and heartbeat intervals settable.

After a pull that finds no message, flwr 1.41's SuperNode sleeps 3 s before it asks the SuperLink again. It pulls
right after pushing a reply, mostly before the coordinator has sent its next message, so each message (a round's
training, an evaluation, each of SecAgg+'s four stages) waits up to 3 s to be picked up, 2.5-4.5 s of every round
(README, Federated training: round overhead). ``--idle-pull-s`` sets that interval: lower gives quicker rounds and
costs one request per interval per site at the coordinator while idle. Its local waits (a reply from the ClientApp,
an object in its own store: 0.5 s in Flower) poll every 0.05 s. ``--heartbeat-s`` sets the heartbeat interval the
SuperNode declares to the SuperLink (Flower's: 30 s; the SuperLink accepts 10-1800): a site that dies is "Node
Unavailable" to the coordinator after two missed intervals, 20 s at the least instead of 60 s, for a heartbeat
request every (interval - 5 s) x 0.7-0.9. Everything else is Flower's own code, unchanged:

    python -m radfed.federation.site.supernode --idle-pull-s 1 -- --isolation process --superlink ...

(the ``--`` is needed: what follows it goes to Flower unread).

Written for flwr 1.41 (pinned in pyproject.toml): its ``start_client_internal`` sleeps through the module's ``time``.
Where a later version does not, the SuperNode runs with Flower's intervals and says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

FLOWER_IDLE_PULL_S = 3.0  # start_client_internal's sleep after an empty pull
FLOWER_LOCAL_WAIT_S = 0.5  # its waits on its own state: the ClientApp's reply, an object's content
LOCAL_WAIT_S = 0.05
FLOWER_HEARTBEAT_S = 30  # flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL
HEARTBEAT_RANGE_S = (10, 1800)  # what the SuperLink accepts (HEARTBEAT_MIN_INTERVAL, HEARTBEAT_MAX_INTERVAL)


class _Intervals:
    """start_client_internal's ``time``: its two sleeps (told apart by their length) shortened, the rest unchanged."""

    def __init__(self, idle_pull_s: float) -> None:
        self.idle_pull_s = idle_pull_s

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_PULL_S:
            seconds = self.idle_pull_s
        elif seconds == FLOWER_LOCAL_WAIT_S:
            seconds = LOCAL_WAIT_S
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def set_intervals(internal: ModuleType, idle_pull_s: float) -> bool:
    """Give the SuperNode's loop (``flwr.supernode.start_client_internal``) these intervals; False where the module
    does not sleep through ``time`` (another flwr version): it keeps its own."""
    if getattr(internal, "time", None) is not time:
        return False
    internal.time = _Intervals(idle_pull_s)  # type: ignore[attr-defined]
    return True


def set_heartbeat(modules: list[ModuleType], interval_s: int) -> bool:
    """Declare and send heartbeats at this interval: the modules that read Flower's default interval at call time
    (the SuperNode's fleet connection declares it, the heartbeat sender paces itself by it). False, changing
    nothing, where one of them does not hold the default under that name (another flwr version)."""
    name = "HEARTBEAT_DEFAULT_INTERVAL"
    if any(getattr(module, name, None) != FLOWER_HEARTBEAT_S for module in modules):
        return False
    for module in modules:
        setattr(module, name, interval_s)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="flower-supernode with settable idle pull and heartbeat intervals")
    parser.add_argument(
        "--idle-pull-s",
        type=float,
        default=FLOWER_IDLE_PULL_S,
        help="seconds between the SuperNode's pulls while it has no message (Flower's: 3)",
    )
    parser.add_argument(
        "--heartbeat-s",
        type=int,
        default=FLOWER_HEARTBEAT_S,
        help="the heartbeat interval declared to the SuperLink, 10-1800 (Flower's: 30); dead after two missed",
    )
    parser.add_argument("supernode", nargs=argparse.REMAINDER, help="-- flower-supernode's own arguments")
    args = parser.parse_args(argv)
    if args.idle_pull_s <= 0:
        parser.error("--idle-pull-s must be positive")
    if not HEARTBEAT_RANGE_S[0] <= args.heartbeat_s <= HEARTBEAT_RANGE_S[1]:
        parser.error(f"--heartbeat-s must be within {HEARTBEAT_RANGE_S[0]}-{HEARTBEAT_RANGE_S[1]} (the SuperLink's)")
    supernode_args = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode

    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection, start_client_internal
    from flwr.supernode.cli import flower_supernode

    handler = logging.StreamHandler()  # its own: flwr's loggers propagate, a root handler would repeat their lines
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s radfed-supernode: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if set_intervals(start_client_internal, args.idle_pull_s):
        logger.info("pulling every %.2f s while idle", args.idle_pull_s)
    else:
        logger.warning("this flwr's SuperNode loop cannot be given an idle pull interval: Flower's own is used")
    if args.heartbeat_s != FLOWER_HEARTBEAT_S:
        if set_heartbeat([fleet_http_connection, heartbeat], args.heartbeat_s):
            logger.info("heartbeat interval %d s", args.heartbeat_s)
        else:
            logger.warning("this flwr's SuperNode cannot be given a heartbeat interval: Flower's own is used")
    sys.argv = ["flower-supernode", *supernode_args]
    flower_supernode()


if __name__ == "__main__":
    main()
