"""A ClientApp for the federation test only: radfed's own handlers, plus two test hooks.

- Fault injection: a site whose node config says ``poison='sign-flip'`` or ``poison='scale'`` sends a
  manipulated update (a malicious or broken hospital). The real radfed ClientApp has no such switch.
- A straggler: a site whose node config says ``hold-round-1='<file>'`` answers round 1's training message only
  once that file exists (the test creates it when it wants the late update to arrive).
- Inspection: every reply a site sends is described (record names and kinds, metric names, array shapes;
  never values) in ``<state-dir>/sent.jsonl`` so the test can check what left the site, beside the poisoning
  alerts the message brought (as received) so the test can check what the coordinator told every site.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from radfed.federation.job import records
from radfed.federation.job.alerts import ALERTS_CONFIG_KEY
from radfed.federation.site import client_app

app = ClientApp()
Handler = Callable[[Message, Context], Message]


def _describe(reply: Message) -> dict[str, object]:
    described: dict[str, object] = {}
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            content = RecordDict({name: record})
            described[name] = {
                "kind": "arrays",
                "shapes": [list(a.shape) for a in records.arrays(content, name)],  # the tensors it decodes to
                "wire": {
                    key: [str(a.dtype), list(a.shape)]
                    for key, a in zip(record.keys(), record.to_numpy_ndarrays(), strict=True)
                },
            }
        elif isinstance(record, MetricRecord):
            described[name] = {"kind": "metrics", "keys": sorted(record.keys())}
        elif isinstance(record, ConfigRecord):
            described[name] = {"kind": "config", "keys": sorted(record.keys())}
        else:
            described[name] = {"kind": type(record).__name__}
    return described


def _received_alerts(msg: Message) -> list[object]:
    config = msg.content.get("config")
    if not isinstance(config, ConfigRecord) or ALERTS_CONFIG_KEY not in config:
        return []
    alerts: list[object] = json.loads(str(config[ALERTS_CONFIG_KEY]))
    return alerts


def recorded(handler: Handler) -> Handler:
    def wrapper(msg: Message, context: Context) -> Message:
        reply = handler(msg, context)
        state = Path(str(context.node_config.get("state-dir", ".")))
        state.mkdir(parents=True, exist_ok=True)
        line = {
            "type": msg.metadata.message_type,
            "records": _describe(reply),
            "received_alerts": _received_alerts(msg),
        }
        with (state / "sent.jsonl").open("a") as log:
            log.write(json.dumps(line) + "\n")
        return reply

    return wrapper


HOLD_LIMIT_S = 600


def _hold(msg: Message, context: Context) -> None:
    gate = str(context.node_config.get("hold-round-1", ""))
    config = msg.content.get("config")
    if gate and isinstance(config, ConfigRecord) and int(str(config.get("server-round", 0))) == 1:
        waited = time.monotonic()
        while not Path(gate).exists() and time.monotonic() - waited < HOLD_LIMIT_S:
            time.sleep(0.2)


@recorded
def _train(msg: Message, context: Context) -> Message:
    _hold(msg, context)
    reply = client_app.train(msg, context)
    attack = str(context.node_config.get("poison", ""))
    if attack:
        sent = records.arrays(msg.content)
        honest = records.arrays(reply.content)
        factor = -1.0 if attack == "sign-flip" else 20.0
        reply.content["arrays"] = records.pack_arrays(
            [(g + factor * (h - g)).astype(h.dtype) for g, h in zip(sent, honest, strict=True)]
        )
    return reply


app.train()(_train)
app.evaluate()(recorded(client_app.evaluate))
app.query("fingerprint")(recorded(client_app.fingerprint))
app.query("landmarks")(recorded(client_app.landmarks))
app.query("rollout")(recorded(client_app.rollout))
