"""The ServerApp of the secure-aggregation test: radfed's own, with a recorder of what the coordinator receives.

Every reply the ServerApp pulls is described in ``<out-dir>/received.jsonl`` (each record's name and kind; for an
array record, its arrays' dtypes and element counts), and each masked update of a secure round is saved, without its
masked weight (``<out-dir>/masked/<round>-<node>.npy``). The site side is ``secure_client_app``: apart, so that a
ClientApp task does not import the coordinator (and torch with it) for every message. The real app has no recorder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid, ServerApp

from radfed.federation.coordinator import server_app as radfed_server

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
