"""The Flower ClientApp: thin over radfed.federation.site (which knows nothing of Flower)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from radfed.federation import records
from radfed.federation.messages import allowed_metrics
from radfed.federation.privacy import PrivacySettings
from radfed.federation.site import SiteConfig, train_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    site = SiteConfig.from_node_config(dict(context.node_config))
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
    arrays, metrics = train_round(
        site,
        job=records.text(config, "job"),
        task=records.text(config, "task") or None,
        arrays=records.arrays(msg.content),
        local_steps=records.integer(config, "local-steps"),
        privacy=privacy,
        seed=records.integer(config, "server-round", 0),
    )
    reply = MetricRecord(dict(allowed_metrics(metrics)))
    return Message(content=RecordDict({"arrays": ArrayRecord(arrays), "metrics": reply}), reply_to=msg)
