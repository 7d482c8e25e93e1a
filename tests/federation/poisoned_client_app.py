"""A ClientApp for fault injection only: radfed's own handlers, except that a site whose node config says
``poison='sign-flip'`` or ``poison='scale'`` sends a manipulated update (a malicious or broken hospital).
The real radfed ClientApp has no such switch; the test swaps this one in for its Flower app copy."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from radfed.federation import client_app, records

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    attack = str(context.node_config.get("poison", ""))
    if attack:
        sent = records.arrays(msg.content)
        honest = records.arrays(reply.content)
        factor = -1.0 if attack == "sign-flip" else 20.0
        reply.content["arrays"] = ArrayRecord(
            [(g + factor * (h - g)).astype(h.dtype) for g, h in zip(sent, honest, strict=True)]
        )
    return reply


app.evaluate()(client_app.evaluate)
app.query("landmarks")(client_app.landmarks)
app.query("rollout")(client_app.rollout)
