"""Flower apps for the secure-aggregation test: radfed's own ServerApp and ClientApp, each with a recorder.

- Server side, what the coordinator receives: every reply the ServerApp pulls is described in
  ``<out-dir>/received.jsonl`` (each record's name and kind; for an array record, its arrays' dtypes and
  element counts), and each masked update of a secure round is saved, without its masked weight
  (``<out-dir>/masked/<round>-<node>.npy``).
- Site side, what the coordinator must never see: inside SecAgg+'s mod, the clear update each site is about to
  mask, its weight and the global model it trained from (``<state-dir>/clear/round-<round>.npz``); and a dropout
  on demand (node config ``drop-secure-round``).
The real apps have neither recorder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid, ServerApp

from radfed.federation.coordinator import server_app as radfed_server
from radfed.federation.job import records
from radfed.federation.site import client_app as radfed_client
from radfed.federation.site.secure_aggregation import LEGACY_PARAMETERS, secure_aggregation_mod

server = ServerApp()


class RecordingGrid:
    """The ServerApp's grid, writing down every reply it pulls."""

    def __init__(self, grid: Grid, out: Path) -> None:
        self.grid, self.out = grid, out
        (out / "masked").mkdir(parents=True, exist_ok=True)

    def pull_messages(self, message_ids: Any) -> Any:
        replies = list(self.grid.pull_messages(message_ids))
        with (self.out / "received.jsonl").open("a") as log:
            for reply in replies:
                log.write(json.dumps(self._describe(reply)) + "\n")
        return replies

    def _describe(self, reply: Message) -> dict[str, Any]:
        line: dict[str, Any] = {"type": reply.metadata.message_type, "group": reply.metadata.group_id, "records": {}}
        if reply.has_error():
            return line | {"error": str(reply.error.reason)[:200]}
        for name, record in reply.content.items():
            if isinstance(record, ArrayRecord):
                arrays = record.to_numpy_ndarrays() if len(record) else []
                line["records"][name] = {"kind": "arrays", "arrays": [[str(a.dtype), int(a.size)] for a in arrays]}
            elif isinstance(record, ConfigRecord):
                line["records"][name] = {"kind": "config", "keys": sorted(record.keys())}
                if name == RECORD_KEY_CONFIGS and Key.MASKED_PARAMETERS in record:
                    vectors = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
                    node = reply.metadata.src_node_id
                    masked = np.concatenate([v.ravel() for v in vectors[1:]])  # [0]: the masked weight
                    np.save(self.out / "masked" / f"{reply.metadata.group_id}-{node}.npy", masked)
            else:
                line["records"][name] = {"kind": type(record).__name__}
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


@server.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out-dir"]))
    radfed_server.main(RecordingGrid(grid, out), context)  # type: ignore[arg-type]


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
