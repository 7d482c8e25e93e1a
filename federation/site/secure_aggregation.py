"""Secure aggregation at a site (run config ``secure-aggregation``): Flower's SecAgg+ client protocol
(``secaggplus_mod``) around radfed's train handler.

A secure round is four ``train`` messages: setup (key pairs), share keys, collect masked vectors, unmask. Only
the third trains. Flower's mod hands it to radfed's handler in Flower's legacy fit form (``fitins.*`` records) and
masks and quantises what the handler returns before it leaves the site. Here that is the site's update (trained
minus received), clipped to ``update-clip-norm`` so that no coordinate leaves the range the masked integers
cover, and its weight (training studies, at most the round's max weight the coordinator sent). Messages without
SecAgg+'s config record pass through the mod untouched: with the key off nothing changes.

This module is imported by the thin ClientApp: flwr and numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

LEGACY_PARAMETERS = "fitins.parameters"  # Flower's FitIns as records: the global model of the round
LEGACY_CONFIG = "fitins.config"  # ... and radfed's round config


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ client for the messages of a secure round; every other message as before."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure_train(content: RecordDict) -> bool:
    """Whether a train message is the training step of a secure round (the model in Flower's legacy form)."""
    return LEGACY_PARAMETERS in content.array_records


def clipped_update(
    trained: Sequence[np.ndarray], received: Sequence[np.ndarray], clip_norm: float
) -> tuple[list[np.ndarray], bool]:
    """The site's update (trained - received, float32), scaled down to L2 norm ``clip_norm`` if longer, and
    whether it was. Every coordinate then lies in [-clip_norm, clip_norm], the range SecAgg+ quantises."""
    if len(trained) != len(received):
        raise ValueError(f"{len(trained)} trained tensors for {len(received)} received")
    pairs = zip(trained, received, strict=True)
    update = [np.asarray(t, dtype=np.float32) - np.asarray(r, dtype=np.float32) for t, r in pairs]
    norm = float(np.sqrt(sum(float(np.square(u, dtype=np.float64).sum()) for u in update)))
    if not np.isfinite(norm):
        raise ValueError("the site's update is not finite")
    if norm <= clip_norm:
        return update, False
    scale = np.float32(clip_norm / norm)
    return [u * scale for u in update], True


def secure_weight(examples: int, max_weight: float) -> int:
    """The weight the site masks its update with: its training studies, capped at the round's max weight (SecAgg+
    scales an update by weight / max weight before quantising; above 1 it could overflow the range)."""
    return max(1, min(int(examples), int(max_weight)))


def legacy_train_reply(update: Sequence[np.ndarray], weight: int, records: RecordDict) -> RecordDict:
    """The reply Flower's mod expects from the training step (``fitres.*``), with radfed's own ``records``
    (allow-listed metrics, site name) beside it: the mod masks the update and clears every array record."""
    fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(update)), weight, {})
    content = fitres_to_recorddict(fit, keep_input=False)
    for name, record in records.items():
        content[name] = record
    return content
