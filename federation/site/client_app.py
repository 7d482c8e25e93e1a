"""The Flower ClientApp: thin on purpose. Flower starts a new process for every message, so this one
imports only flwr and numpy and forwards each message to the site's long-lived worker
(radfed.federation.site.worker), where torch, the cohort and the job's state stay warm.

Message types: ``train`` (evaluate the incoming global model on held-out studies, then train),
``evaluate`` (the final model), ``query.fingerprint`` (dataset statistics for the job's plan),
``query.landmarks`` (harmonisation statistics) and ``query.rollout``
(store the finished artifact in the node's model registry). Every reply's metrics pass the allow-list.

Under Flower's simulation runtime (``radfed federation simulate``) there is no SuperNode and no node config:
the Ray actor running this app is already warm, so a simulated site is served in this process by the same
handler the worker runs, its data and state under the job's run-config ``simulation-root`` by partition id.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY

from radfed.federation.job import records
from radfed.federation.learning.messages import allowed_metrics
from radfed.federation.site.secure_aggregation import (
    LEGACY_CONFIG,
    LEGACY_PARAMETERS,
    clipped_update,
    is_secure_train,
    legacy_train_reply,
    secure_aggregation_mod,
    secure_weight,
)
from radfed.federation.site.worker import Frame, Request, call_site_worker, handle, simulated_node_config

app = ClientApp(mods=[secure_aggregation_mod])


def _config(msg: Message, key: str = "config") -> dict[str, Any]:
    record = msg.content[key]
    if not isinstance(record, ConfigRecord):
        raise ValueError(f"the message's {key} is not a ConfigRecord")
    return {k: v for k, v in record.items() if not isinstance(v, bytes)}


def _process_age_s() -> float:
    """Seconds since this process started (Linux: start time in clock ticks after boot)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _forward(msg: Message, context: Context, request: Request, frame: Frame, *, with_arrays: bool) -> Message:
    started, start_cost = time.perf_counter(), _process_age_s()
    node_config = dict(context.node_config)
    if PARTITION_ID_KEY in node_config:  # a simulated site: no worker, the Ray actor stays warm
        node_config = simulated_node_config(node_config, frame.header.get("config", {}))
        reply = handle(Frame({"request": str(request), "node_config": node_config, **frame.header}, frame.arrays))
        reply.header["worker_seconds"] = time.perf_counter() - started
        start_cost = 0.0  # the actor is long-lived: nothing started for this message
    else:
        reply = call_site_worker(node_config, request, frame)
    site_name = str(node_config.get("site-name", "site"))
    timings = {
        "site_seconds": float(reply.header.get("worker_seconds", 0.0)),
        "clientapp_start_seconds": start_cost,  # this task's process (new or forked) up to the handler
        "clientapp_seconds": time.perf_counter() - started,
    }
    metrics = allowed_metrics(reply.header["metrics"] | timings)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site_name})})
    if with_arrays:
        content["arrays"] = records.pack_arrays(reply.arrays)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secure_train(msg.content):
        return _secure_train(msg, context)
    frame = Frame({"config": _config(msg)}, records.arrays(msg.content))
    return _forward(msg, context, Request.TRAIN, frame, with_arrays=True)


def _secure_train(msg: Message, context: Context) -> Message:
    """The training step of a secure round: the same training, then the clipped update and its weight in the
    form Flower's SecAgg+ mod masks (site/secure_aggregation.py)."""
    config = _config(msg, LEGACY_CONFIG)
    cap = records.number(config, records.SECURE_MAX_WEIGHT)
    del config[records.SECURE_MAX_WEIGHT]  # the coordinator's, for this round only: not a run-config key
    received = records.arrays(msg.content, LEGACY_PARAMETERS)
    reply = _forward(msg, context, Request.TRAIN, Frame({"config": config}, received), with_arrays=True)
    clip = records.number(config, "update-clip-norm")
    update, clipped = clipped_update(records.arrays(reply.content), received, clip)
    metrics = records.metrics(reply.content)
    weight = secure_weight(records.integer(metrics, "num-examples", 1), cap)
    metrics["update_clipped"] = float(clipped)
    content = RecordDict({"metrics": MetricRecord(allowed_metrics(metrics)), "site": reply.content["site"]})
    return Message(content=legacy_train_reply(update, weight, content), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    frame = Frame({"config": _config(msg)}, records.arrays(msg.content))
    return _forward(msg, context, Request.EVALUATE, frame, with_arrays=False)


@app.query("landmarks")
def landmarks(msg: Message, context: Context) -> Message:
    return _forward(msg, context, Request.LANDMARKS, Frame({"config": _config(msg)}, []), with_arrays=False)


@app.query("fingerprint")
def fingerprint(msg: Message, context: Context) -> Message:
    return _forward(msg, context, Request.FINGERPRINT, Frame({"config": _config(msg)}, []), with_arrays=False)


@app.query("rollout")
def rollout(msg: Message, context: Context) -> Message:
    files = records.files(msg.content["artifact"])
    frame = Frame({"files": list(files)}, [np.frombuffer(content, dtype=np.uint8) for content in files.values()])
    return _forward(msg, context, Request.ROLLOUT, frame, with_arrays=False)
