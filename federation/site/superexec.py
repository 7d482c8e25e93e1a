"""radfed's SuperExec: runs the site's ClientApp tasks for a SuperNode started with ``--isolation process``.

Flower's own SuperExec starts a new ``flwr-clientapp`` process for every message, which imports flwr
again before our handler runs: 1.2-3.8 s per round on this machine's 2 shared cores (bench federation,
"ClientApp process start"). This one imports flwr's ClientApp runtime and radfed's ClientApp once, then
forks a child per task; the child runs Flower's own ``run_clientapp`` with the task's token, so pulling
the message, loading the app from the FAB, the heartbeats and the reply are Flower's code. Only the
process start is skipped. Every task still gets its own process (a crash or a hang stays in it).

It polls the SuperNode's Runtime API for tasks every ``--poll-interval`` s (Flower's default: 1 s) and
exits when the SuperNode is gone. Given the SuperNode's command after ``--``, it starts the SuperNode as
its own child, so that a site is one process group (one service to start, stop or kill):

    python -m radfed.federation.site.superexec --runtime-api-address 127.0.0.1:9094 -- \
        flower-supernode --isolation process --host 127.0.0.1 --port 9094 ...

Written for flwr 1.41 (pinned in pyproject.toml): it uses the same Runtime API calls as
``flower-superexec``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from radfed.federation.site.worker import process_alive

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 0.1
# A task can be acquired before the SuperNode holds all of its message's objects (it pulls them from the
# SuperLink meanwhile); Flower then retries after 1 s, 2 s, 4 s (PULL_INITIAL_BACKOFF, for a WAN). The
# Runtime API is this machine's loopback: retry after 50 ms, doubling up to 0.5 s. Measured before this:
# 3.5-8 s from a train task's start to the ClientApp holding its message, vs 0.05 s for a message
# without arrays.
LOCAL_PULL_BACKOFF_S = 0.05
LOCAL_PULL_BACKOFF_CAP_S = 0.5


def _watch(supernode_pid: int) -> None:
    def watchdog() -> None:
        while process_alive(supernode_pid):
            time.sleep(0.5)
        code = 1  # a SuperNode that went away on its own is a failure (systemd restarts the site)
        with contextlib.suppress(ChildProcessError):  # our own child: exit with its status
            _, status = os.waitpid(supernode_pid, os.WNOHANG)
            code = os.waitstatus_to_exitcode(status) or 1
        logger.info("SuperNode %d is gone: exiting with %d", supernode_pid, code)
        os._exit(code if code > 0 else 1)

    threading.Thread(target=watchdog, daemon=True).start()


def _reap(tasks: set[int]) -> None:
    """Collect finished task processes (only those: the SuperNode child is the watchdog's)."""
    for pid in list(tasks):
        with contextlib.suppress(ChildProcessError):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            if (code := os.waitstatus_to_exitcode(status)) != 0:
                logger.warning("ClientApp task process %d exited with %d", pid, code)
        tasks.discard(pid)


def _warm_runtime() -> None:
    """Import flwr's ClientApp runtime and radfed's ClientApp (what every task used to pay for at start),
    with the local pull backoff."""
    import functools

    from flwr.supernode.runtime import run_clientapp as runtime

    import radfed.federation.site.client_app  # noqa: F401 - the app the FAB names

    runtime.pull_and_inflate_object_from_tree = functools.partial(
        runtime.pull_and_inflate_object_from_tree,
        initial_backoff=LOCAL_PULL_BACKOFF_S,
        backoff_cap=LOCAL_PULL_BACKOFF_CAP_S,
    )


def _run_task(address: str, token: str, certificates: bytes | None) -> None:
    """In the forked child: Flower's ClientApp runtime for one task, then exit."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    code = 0
    try:
        run_clientapp(
            runtime_api_address=address,
            token=token,
            insecure=certificates is None,
            certificates=certificates,
            parent_pid=os.getppid(),
        )
    except SystemExit as exc:  # flwr_exit ends every task this way
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # the child must never return into the parent's loop
        logger.exception("ClientApp task failed")
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(address: str, supernode_pid: int, poll_interval_s: float, certificates: bytes | None) -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    _warm_runtime()  # once, before any fork
    _watch(supernode_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=certificates is None,
        root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    logger.info("warm SuperExec for SuperNode %d polling %s every %.2f s", supernode_pid, address, poll_interval_s)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
    tasks: set[int] = set()
    while True:
        _reap(tasks)
        response = client.AcquireTask(request)
        if response.HasField("task") and response.token:
            logger.info("task %d: starting", response.task.task_id)
            if (pid := os.fork()) == 0:
                _run_task(address, response.token, certificates)
            tasks.add(pid)
            continue  # another task may be waiting (several runs at once)
        time.sleep(poll_interval_s)


def main() -> None:
    parser = argparse.ArgumentParser(description="radfed warm SuperExec (SuperNode with --isolation process)")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's --host:--port")
    parser.add_argument("--supernode-pid", type=int, help="a SuperNode started elsewhere: exit when it is gone")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL_S)
    parser.add_argument("--root-certificates", type=Path, help="when the Runtime API is served over TLS")
    parser.add_argument("supernode", nargs=argparse.REMAINDER, help="-- flower-supernode ... (started as a child)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s radfed-superexec: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    command = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode
    if bool(command) == (args.supernode_pid is not None):
        parser.error("give either the SuperNode's command after -- or --supernode-pid")
    supernode_pid = subprocess.Popen(command).pid if command else args.supernode_pid
    certificates = args.root_certificates.read_bytes() if args.root_certificates else None
    serve(args.runtime_api_address, supernode_pid, args.poll_interval, certificates)


if __name__ == "__main__":
    main()
