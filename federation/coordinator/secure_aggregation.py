"""Secure aggregation at the coordinator (run config ``secure-aggregation``): one training round through Flower's
SecAgg+ workflow, so that the ServerApp receives every site's update only masked and learns only their weighted
mean (Bell et al. 2020, "Secure single-server aggregation with (poly)logarithmic overhead"; Flower's
``SecAggPlusWorkflow`` and ``secaggplus_mod``).

The workflow is written for Flower's legacy strategies: it asks a ``Strategy`` which sites to train and with what,
and hands it the unmasked result. ``_RoundStrategy`` is that strategy for one radfed round: it names the round's
sites (already drawn by the RoundDriver), gives them radfed's round config, and keeps the unmasked mean update
instead of aggregating anything itself. Each site's allow-listed metrics and name travel beside its masked vector
(the training stage's reply); nothing with an array reaches this process in the clear.

What this costs: screening and robust rules need each update and cannot run (run_config refuses them with this
key); the coordinator checks only what the sum allows (finite, within the clip norm). Weights: SecAgg+ scales an
update by weight / max weight before quantising, so the max weight is the largest training-study count the
coordinator has heard of (sites send it in the clear each round, and with harmonisation before round 1); before
any is known, sites weigh equally.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from radfed.federation.job.records import SECURE_MAX_WEIGHT
from radfed.federation.job.run_config import RunConfig


@dataclass(frozen=True)
class _Site:
    """All SecAgg+'s workflow uses of a legacy ClientProxy: the node id."""

    node_id: int


class _RoundStrategy(Strategy):
    """The legacy strategy of one secure round (see the module docstring)."""

    def __init__(self, fit_ins: FitIns, nodes: Sequence[int]) -> None:
        self.fit_ins = fit_ins
        self.nodes = list(nodes)
        self.mean: list[np.ndarray] | None = None
        self.failures: list[str] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(cast(ClientProxy, _Site(node)), self.fit_ins) for node in self.nodes]

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> tuple[Parameters | None, dict[str, Any]]:
        if results:  # every result carries the same unmasked mean (the workflow's backward compatibility)
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.failures = [str(f)[:300] for f in failures]
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> tuple[float | None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Any]] | None:
        return None


@dataclass
class _StageGrid:
    """The grid as the workflow uses it, polling for replies as the RoundDriver does (Flower's own
    ``send_and_receive`` sleeps 3 s between pulls: four stages a round) and keeping the training stage's replies."""

    grid: Grid
    poll_s: float
    training: dict[int, Message] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # node -> why its reply to a stage was an error

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        waiting = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        replies: list[Message] = []
        while waiting and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(waiting)):
                waiting.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
                if reply.has_error():
                    self.errors[reply.metadata.src_node_id] = str(reply.error.reason)[:300]
                elif "metrics" in reply.content:
                    self.training[reply.metadata.src_node_id] = reply
            if waiting:
                time.sleep(self.poll_s)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


@dataclass(frozen=True)
class SecureRound:
    """One secure round's outcome: the unmasked weighted mean of the sites' clipped updates (None when too few
    sites stayed to unmask it), the training stage's reply of each site (metrics, site name, masked vector) and
    why the others failed."""

    mean_update: list[np.ndarray] | None
    replies: dict[int, Message]
    failures: list[str]
    errors: dict[int, str]  # node -> why it failed a stage

    def masked_bytes(self, node: int) -> int:
        """Bytes of the site's masked vector (what it sent instead of its update)."""
        configs = self.replies[node].content.config_records.get(RECORD_KEY_CONFIGS)
        vectors = configs.get(Key.MASKED_PARAMETERS, []) if configs is not None else []
        return sum(len(v) for v in cast(list[bytes], vectors))


def max_weight(studies_per_site: dict[str, int]) -> int:
    """The round's max weight: the largest training-study count heard of (1 before any: equal weights)."""
    return max([1, *studies_per_site.values()])


def secure_round(
    grid: Grid,
    run: RunConfig,
    server_round: int,
    config: ConfigRecord,
    arrays: Sequence[np.ndarray],
    nodes: Sequence[int],
    weight_cap: int,
    poll_s: float,
) -> SecureRound:
    """Train ``nodes`` on ``arrays`` through SecAgg+; ``config`` is the round's config (``weight_cap`` added)."""
    values = dict(config) | {SECURE_MAX_WEIGHT: weight_cap}
    fit_ins = FitIns(ndarrays_to_parameters([np.asarray(a) for a in arrays]), cast(dict[str, Any], values))
    strategy = _RoundStrategy(fit_ins, nodes)
    base = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=run.secure_aggregation_shares or 1.0,
        reconstruction_threshold=run.secure_aggregation_threshold,
        max_weight=float(weight_cap),
        clipping_range=run.update_clip_norm,
        timeout=run.round_timeout,
    )
    stages = _StageGrid(grid, poll_s)
    workflow(cast(Grid, stages), context)
    mean = strategy.mean
    if mean is not None:
        shapes = [np.asarray(a).shape for a in arrays]
        mean = [np.asarray(m, dtype=np.float32).reshape(s) for m, s in zip(mean, shapes, strict=True)]
    return SecureRound(mean, stages.training, strategy.failures, stages.errors)


def secure_section(run: RunConfig) -> str:
    """The model card's statement of the trade-off ("" without secure aggregation)."""
    if not run.secure_aggregation:
        return ""
    return "\n".join(
        [
            "## Secure aggregation",
            "",
            "Every training round ran Flower's SecAgg+ protocol: each site clipped its update to L2 norm "
            f"{run.update_clip_norm:g} and sent it masked; the coordinator learned only the weighted sum of the "
            "round's updates. No single site's update could be screened for poisoning (the screening rules and "
            "robust aggregation need each update); the coordinator checked only that the mean update was finite and "
            "within the clip norm.",
        ]
    )
