"""The Flower ClientApp: thin over radfed.federation.site (which knows nothing of Flower).

Message types: ``train`` (evaluate the incoming global model on held-out studies, then train),
``evaluate`` (the final model), ``query.landmarks`` (harmonisation statistics) and ``query.rollout``
(store the finished artifact in the node's model registry). Every reply's metrics pass the allow-list.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from radfed.federation import records
from radfed.federation.messages import MetricValue, allowed_metrics
from radfed.federation.privacy import PrivacySettings
from radfed.federation.site import (
    RoundPlan,
    SiteConfig,
    evaluate_round,
    install_rollout,
    intensity_landmarks,
    train_round,
)

app = ClientApp()


def round_plan(config: Any) -> RoundPlan:
    epsilon = records.number(config, "epsilon", 0.0)
    privacy = (
        PrivacySettings(
            epsilon=epsilon,
            delta=records.number(config, "delta"),
            max_grad_norm=records.number(config, "max-grad-norm", 1.0),
            planned_steps=records.integer(config, "num-rounds") * records.integer(config, "local-steps"),
        )
        if epsilon > 0
        else None
    )
    return RoundPlan(
        job=records.text(config, "job"),
        task=records.text(config, "task") or None,
        local_steps=records.integer(config, "local-steps", 1),
        seed=records.integer(config, "server-round", 0),
        privacy=privacy,
        harmonisation=records.landmarks(config),
        proximal_mu=records.number(config, "proximal-mu", 0.0),
        held_out_fraction=records.number(config, "held-out-fraction", 0.25),
    )


def _reply(msg: Message, site: SiteConfig, metrics: dict[str, MetricValue], arrays: ArrayRecord | None) -> Message:
    content = RecordDict({"metrics": MetricRecord(allowed_metrics(metrics)), "site": ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = SiteConfig.from_node_config(dict(context.node_config))
    arrays, metrics = train_round(site, round_plan(msg.content["config"]), records.arrays(msg.content))
    return _reply(msg, site, metrics, ArrayRecord(arrays))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = SiteConfig.from_node_config(dict(context.node_config))
    metrics = evaluate_round(site, round_plan(msg.content["config"]), records.arrays(msg.content))
    return _reply(msg, site, metrics, None)


@app.query("landmarks")
def landmarks(msg: Message, context: Context) -> Message:
    site = SiteConfig.from_node_config(dict(context.node_config))
    plan = round_plan(msg.content["config"])
    return _reply(msg, site, intensity_landmarks(site, plan.task, plan.held_out_fraction), None)


@app.query("rollout")
def rollout(msg: Message, context: Context) -> Message:
    site = SiteConfig.from_node_config(dict(context.node_config))
    files = records.files(msg.content["artifact"])
    install_rollout(site, files)
    return _reply(msg, site, {"model_installed": 1}, None)
