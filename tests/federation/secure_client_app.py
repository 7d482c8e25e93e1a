"""The ClientApp of the secure-aggregation test: radfed's own, with a recorder of what the coordinator must never see.

Inside SecAgg+'s mod, the clear update each site is about to mask, its weight and the global model it trained from
are saved (``<state-dir>/clear/round-<round>.npz``); a site drops out on demand (node config ``drop-secure-round``).
It imports only what radfed's ClientApp imports (the warm SuperExec has those loaded), not the coordinator: each
message's task imports this module afresh. The real app has no recorder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from radfed.federation.job import records
from radfed.federation.site import client_app as radfed_client
from radfed.federation.site.secure_aggregation import LEGACY_PARAMETERS, secure_aggregation_mod


def record_clear_update(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Inside SecAgg+'s mod: the clear update of a secure round's training step, saved before it is masked. A site
    whose node config says ``drop-secure-round=N`` fails round N's training step instead: a hospital lost after it
    shared its keys, before it sent its masked update (the dropout SecAgg+ must survive)."""
    training = LEGACY_PARAMETERS in msg.content.array_records
    if training and str(context.node_config.get("drop-secure-round", "")) == msg.metadata.group_id:
        raise RuntimeError("test: this site drops out of the secure round")
    reply = call_next(msg, context)
    if training and "fitres.parameters" in reply.content.array_records:
        folder = Path(str(context.node_config.get("state-dir", "."))) / "clear"
        folder.mkdir(parents=True, exist_ok=True)
        update = reply.content.array_records["fitres.parameters"].to_numpy_ndarrays()
        received = records.arrays(msg.content, LEGACY_PARAMETERS)
        weight = reply.content.metric_records["fitres.num_examples"]["num_examples"]
        np.savez(
            folder / f"round-{msg.metadata.group_id}.npz",
            weight=np.float64(weight),  # type: ignore[arg-type]
            **{f"update_{i}": u for i, u in enumerate(update)},
            **{f"received_{i}": r for i, r in enumerate(received)},
        )
    return reply


client = ClientApp(mods=[secure_aggregation_mod, record_clear_update])
client.train()(radfed_client.train)
client.evaluate()(radfed_client.evaluate)
client.query("fingerprint")(radfed_client.fingerprint)
client.query("landmarks")(radfed_client.landmarks)
client.query("rollout")(radfed_client.rollout)
