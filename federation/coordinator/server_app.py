"""The Flower ServerApp: harmonisation, rounds of site training with evaluation, robust aggregation, a
checkpoint and a metrics line per round, then the ONNX artifact, its model card and the rollout to every
site's model registry. Thin over radfed.federation (the bookkeeping is in coordinator.py)."""

from __future__ import annotations

import json
import random
import resource
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from radfed.federation.coordinator.checkpoint import (
    CoordinatorCheckpoint,
    QuorumError,
    append_metrics,
    calibration_section,
    evaluation_line,
    landmark_metrics,
    model_card,
    reference_landmarks,
)
from radfed.federation.coordinator.secure_aggregation import max_weight, secure_round, secure_section
from radfed.federation.job import records
from radfed.federation.job.alerts import PROVENANCE_KEY, PoisoningAlert, federation_id
from radfed.federation.job.planning import (
    PLAN_CONFIG_KEY,
    fingerprint_from_metrics,
    job_plan,
    needs_fingerprint,
    planned_spec,
)
from radfed.federation.job.run_config import RoundConfig, RunConfig
from radfed.federation.learning.aggregation import (
    AggregationOutcome,
    NothingToAggregateError,
    ServerOptimizer,
    SiteUpdate,
    aggregate,
)
from radfed.federation.learning.calibration import PooledSums
from radfed.federation.learning.compression import payload_nbytes, restore_reply
from radfed.federation.learning.export import export_artifact
from radfed.federation.learning.membership import SiteAudit, card_section, site_audits
from radfed.federation.learning.staleness import LateUpdates, rebase, staleness_weight
from radfed.federation.learning.streaming import StreamingAggregator
from radfed.federation.learning.subgroups import card_section as bias_section
from radfed.federation.learning.subgroups import subgroup_table
from radfed.federation.learning.training import arrays_to_model, direction_screened, model_to_arrays, new_model
from radfed.inference.model.artifact import MANIFEST, MODEL_FILE, ModelArtifact, load_artifact
from radfed.inference.model.recipe import TrainingRecipe
from radfed.inference.model.taskspec import Outputs, TaskSpec, TaskSpecError, load_task_spec
from radfed.inference.pipeline.findings import ModelIdentity

app = ServerApp()
REPLY_POLL_S = 0.25  # between pulls for replies (a cheap request to the SuperLink)


@dataclass(frozen=True)
class Outstanding:
    """A training message whose round closed before the site answered: the site is still training on it."""

    origin_round: int
    node: int
    sent: float  # time.monotonic() at push; after round-timeout without a reply the site is asked again


LateHandler = Callable[[str, Outstanding, Message], None]
# A training round's replies (site -> node, metrics, content), errors, aggregation outcome, bytes each site sent,
# late-update lines and unreadable replies.
_Training = tuple[
    dict[str, tuple[int, dict[str, Any], RecordDict]],
    dict[str, str],
    AggregationOutcome,
    dict[str, int],
    list[dict[str, Any]],
    dict[str, str],
]


def say(text: str) -> None:
    """The operator's run log (``flwr run --stream`` / ``flwr log``); never patient data."""
    print(f"radfed: {text}", flush=True)


class RoundDriver:
    """One federated job at the coordinator: sends each round's messages through Flower's grid, screens and
    aggregates the replies, and keeps the CoordinatorCheckpoint a restarted ServerApp resumes from."""

    def __init__(self, grid: Grid, run: RunConfig, recipe: TrainingRecipe | None = None) -> None:
        self.grid = grid
        self.run = run
        # the job's training recipe: its schedule decides the rounds the direction rule screens (None: every round)
        self.recipe = recipe
        self.rounds = run.num_server_rounds
        self.min_sites = run.min_sites
        self.timeout = run.round_timeout
        self.attempts = run.round_attempts
        self.out = Path(run.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.server = ServerOptimizer(run.server_learning_rate, run.server_momentum, run.server_optimizer)
        # Stragglers (run config round-quorum / round-deadline): message id -> the round it belongs to, and the
        # global model each such round started from (a folded late update is rebased from it). In memory only: a
        # restarted ServerApp no longer waits for them (their updates are lost, as dropped ones are).
        self.outstanding: dict[str, Outstanding] = {}
        self.origins: dict[int, list[np.ndarray]] = {}
        self.asked: set[int] = set()  # the sites asked in the latest exchange

    def config(self, server_round: int, state: CoordinatorCheckpoint, outputs: Outputs | None = None) -> ConfigRecord:
        """Every message's config: the whole run config (the site parses it back with ``RoundConfig``), the
        round, the plan and reference landmarks once fixed, and every poisoning alert of the job so far; with
        ``outputs`` (the final evaluation), the artifact's lesion rules."""
        alerts = state.alerts(self.run.anonymise_alerts)
        round_config = RoundConfig(self.run, server_round, state.plan, state.harmonisation, alerts, state.job_instance)
        if outputs is not None:
            round_config = replace(
                round_config, lesion_fraction=outputs.lesion_fraction, lesion_slices=outputs.lesion_slices
            )
        values: dict[str, Any] = round_config.to_record()
        return ConfigRecord(values)

    def nodes(self) -> list[int]:
        deadline = time.monotonic() + self.timeout
        while len(nodes := sorted(self.grid.get_node_ids())) < self.min_sites:
            if time.monotonic() > deadline:
                raise QuorumError(f"{len(nodes)} site(s) connected after {self.timeout:.0f} s; quorum {self.min_sites}")
            time.sleep(1)
        return nodes

    def exchange(
        self,
        message_type: str,
        content: RecordDict,
        group: str,
        fold: Callable[[str, dict[str, Any], RecordDict], None] | None = None,
        late: LateHandler | None = None,
        server_round: int = 0,
        sample: int = 0,
    ) -> tuple[dict[str, tuple[int, dict[str, Any], RecordDict]], dict[str, str]]:
        """Send to every connected site; a site that fails or times out is reported, never fatal by itself.
        Below quorum, only the sites that have not answered yet are asked again (a site that already
        trained must not spend privacy budget twice for one round). With ``fold``, each reply's content is
        handed to it as it arrives and not kept (an empty record in its place).

        With ``late`` (a training round of a job whose rounds may close early), the round closes at the run
        config's round-quorum or round-deadline; a site still training then is not asked again while it is, and
        its reply, whenever it comes, goes to ``late`` (with the round it belongs to) instead of its round.

        With ``sample`` (run config sites-per-round), only that many of the sites are asked; a retry below quorum
        draws the missing number again from the sites not asked yet."""
        replies: dict[str, tuple[int, dict[str, Any], RecordDict]] = {}
        errors: dict[str, str] = {}
        answered: set[int] = set()
        self.asked = set()
        started = time.monotonic()
        for attempt in range(self.attempts):
            busy = self._busy() if late is not None else set()
            pending = [n for n in self.nodes() if n not in answered and n not in busy]
            if sample:
                pending = self._sample(pending, sample - len(replies), f"{server_round}:{attempt}")
            self.asked |= set(pending)
            messages = [
                Message(content=content, message_type=message_type, dst_node_id=n, group_id=group) for n in pending
            ]
            destination = {m.object_id: m.metadata.dst_node_id for m in messages}  # the id Flower assigns on push
            heard: set[int] = set()

            def closed() -> bool:
                fresh = len(replies)
                if late is None or fresh < self.min_sites:
                    return False
                quorum = self.run.round_quorum
                deadline = self.run.round_deadline
                return (quorum > 0 and fresh >= quorum) or (deadline > 0 and time.monotonic() - started >= deadline)

            unanswered: set[str] = set()
            for reply in self._send_and_receive(messages, closed if late is not None else None, unanswered, late):
                node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                heard.add(node)
                if reply.has_error():
                    errors[f"node-{node}"] = str(reply.error.reason)[:300]
                    continue
                answered.add(node)
                errors.pop(f"node-{node}", None)
                site = str(reply.content["site"]["name"]) if "site" in reply.content else f"node-{node}"
                metrics: dict[str, Any] = dict(records.metrics(reply.content))
                if fold is not None:
                    if site in replies:
                        continue  # folded in already
                    fold(site, metrics, reply.content)
                replies[site] = (node, metrics, reply.content if fold is None else RecordDict())
            if late is not None and closed():  # closed early: the sites still training are stragglers, not errors
                now = time.monotonic()
                for message_id in unanswered:
                    self.outstanding[message_id] = Outstanding(server_round, destination[message_id], now)
                heard |= {destination[m] for m in unanswered}
            for node in set(pending) - heard:
                errors[f"node-{node}"] = f"no reply within {self.timeout:.0f} s"
            if len(replies) >= self.min_sites:
                return replies, errors
            say(f"{message_type} {group}: {len(replies)} site(s) answered, quorum {self.min_sites}; errors {errors}")
        raise QuorumError(
            f"{message_type} {group}: quorum of {self.min_sites} not reached in {self.attempts} attempts ({errors})"
        )

    def _sample(self, candidates: list[int], wanted: int, draw: str) -> list[int]:
        """``wanted`` of ``candidates``, drawn from the job's seed (the same job and round draw the same sites
        among the same ones), preferring sites not yet asked in this round."""
        fresh = [n for n in candidates if n not in self.asked]
        again = [n for n in candidates if n in self.asked]
        rng = random.Random(f"{self.run.job}:{self.run.seed}:{draw}")
        chosen = rng.sample(fresh, min(max(0, wanted), len(fresh)))
        return sorted(chosen + again[: max(0, wanted - len(chosen))])

    def _send_and_receive(
        self,
        messages: list[Message],
        closed: Callable[[], bool] | None = None,
        unanswered: set[str] | None = None,
        late: LateHandler | None = None,
    ) -> Iterator[Message]:
        """Push the messages, then collect replies until all are in, ``closed()`` says the round is closed, or
        ``round-timeout`` passes; the ids still without a reply are left in ``unanswered``. With ``late``, replies
        to earlier rounds' outstanding messages are pulled too and handed to it. Flower's own
        ``send_and_receive`` sleeps 3 s between pulls, which every round paid on average 1.5 s of."""
        waiting = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and waiting and not (closed is not None and closed()):
            asked = list(waiting | set(self.outstanding)) if late is not None else list(waiting)
            for reply in self.grid.pull_messages(asked):
                message_id = reply.metadata.reply_to_message_id
                if message_id in waiting:
                    waiting.discard(message_id)
                    yield reply
                elif late is not None and message_id in self.outstanding:
                    outstanding = self.outstanding.pop(message_id)
                    late(f"node-{outstanding.node}", outstanding, reply)
            if waiting and not (closed is not None and closed()):
                time.sleep(REPLY_POLL_S)
        if unanswered is not None:
            unanswered |= waiting

    def _busy(self) -> set[int]:
        """Sites still training on an earlier round's message; one silent for round-timeout is given up on (it
        may have died: it is asked again, and its old reply, should it still come, is ignored)."""
        now = time.monotonic()
        for message_id, outstanding in list(self.outstanding.items()):
            if now - outstanding.sent > self.timeout:
                del self.outstanding[message_id]
                say(f"node-{outstanding.node}: no reply to round {outstanding.origin_round} in {self.timeout:.0f} s")
        rounds = {o.origin_round for o in self.outstanding.values()}
        self.origins = {r: a for r, a in self.origins.items() if r in rounds}
        return {o.node for o in self.outstanding.values()}

    def plan(self, spec: TaskSpec, state: CoordinatorCheckpoint) -> TaskSpec:
        """Fix the job's plan before round 1: from the spec alone when it fixes the grid and patch, otherwise
        from the sites' fingerprint summaries (merged, study-weighted)."""
        started = time.perf_counter()
        site_prints = None
        errors: dict[str, str] = {}
        if needs_fingerprint(spec):
            replies, errors = self.exchange(
                "query.fingerprint", RecordDict({"config": self.config(0, state)}), "fingerprint"
            )
            site_prints = {site: fingerprint_from_metrics(m) for site, (_, m, _) in replies.items()}
        plan = job_plan(spec, site_prints, private=self.run.epsilon > 0)
        state.plan = plan.to_json()
        append_metrics(
            self.out,
            {
                "stage": "plan",
                "seconds": time.perf_counter() - started,
                "sites": sorted(site_prints or {}),
                "plan": json.loads(state.plan),
                "errors": errors,
            },
        )
        say(f"plan: {plan.reasons[-1] if plan.reasons else 'from the task spec'}; patch {list(plan.patch_size)}")
        return spec.planned(plan)

    def start_from(self, base: ModelArtifact, spec: TaskSpec, state: CoordinatorCheckpoint) -> TaskSpec:
        """Fine-tune a base model: its plan and weights start the job (the sites' fingerprints are not asked)."""
        if base.spec.name != spec.name or base.spec.plan is None or base.weights_path is None:
            raise ValueError(f"base model {base.key} is not a {spec.name} model with a plan and torch weights")
        state.plan = base.spec.plan.to_json()
        with np.load(base.weights_path) as saved:
            state.arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        planned = spec.planned(base.spec.plan)
        expected = [tuple(t.shape) for t in new_model(planned).state_dict().values()]
        if [a.shape for a in state.arrays] != expected:
            ensemble = base.spec.model.ensemble
            reason = f" (an ensemble of {ensemble} networks: train the base with one)" if ensemble > 1 else ""
            raise ValueError(f"base model {base.key}'s weights do not fit its plan's network{reason}")
        append_metrics(self.out, {"stage": "plan", "base_model": base.key, "plan": json.loads(state.plan)})
        say(f"fine-tuning base model {base.key} ({base.provenance.get('steps')} steps on public data)")
        return planned

    def harmonise(self, state: CoordinatorCheckpoint) -> None:
        started = time.perf_counter()
        replies, errors = self.exchange("query.landmarks", RecordDict({"config": self.config(0, state)}), "landmarks")
        found = {site: landmark_metrics(m) for site, (_, m, _) in replies.items()}
        weights = {site: int(m.get("landmark_studies", 0)) for site, (_, m, _) in replies.items()}
        state.harmonisation = reference_landmarks(found, weights)
        if self.run.secure_aggregation:  # round 1's max weight (secure_aggregation.max_weight)
            for site, studies in weights.items():
                state.studies_per_site.setdefault(site, studies)
        append_metrics(
            self.out,
            {
                "stage": "harmonisation",
                "seconds": time.perf_counter() - started,
                "site_landmarks": found,
                "reference": state.harmonisation,
                "errors": errors,
            },
        )
        say(f"harmonisation: reference landmarks from {len(found)} site(s)")

    def screens_direction(self, server_round: int) -> bool:
        """Whether this round's updates face the direction rule as well as the norm rule (not once the schedule
        has all but stopped training: aggregation.DIRECTION_MIN_LEARNING_RATE)."""
        if self.recipe is None:
            return True
        return direction_screened(self.recipe, server_round, self.rounds, self.run.local_steps)

    def _plain_training(self, server_round: int, state: CoordinatorCheckpoint) -> _Training:
        """A training round in the clear: every update is screened, then aggregated (streamed when many)."""
        sent = records.pack_arrays(state.arrays)
        content = RecordDict({"arrays": sent, "config": self.config(server_round, state)})
        # Many sites, FedAvg or multi-Krum, sketched screening: fold each update into one sum as it arrives.
        updates_expected = len(list(self.grid.get_node_ids()))
        if self.run.sites_per_round:
            updates_expected = min(updates_expected, self.run.sites_per_round)
        screening = self.run.screening.resolve(updates_expected)
        streams = StreamingAggregator.streams(self.run.aggregation, screening)
        updates: list[SiteUpdate] = []
        bytes_up: dict[str, int] = {}
        unreadable: dict[str, str] = {}
        late_lines: list[dict[str, Any]] = []
        origin = state.arrays
        with (
            StreamingAggregator(
                state.arrays,
                self.run.aggregation,
                screen_direction=self.screens_direction(server_round),
                spill_root=self.out,
            )
            if streams
            else nullcontext()
        ) as stream:

            def add(update: SiteUpdate) -> None:
                if stream is not None:
                    stream.add(update)
                else:
                    updates.append(update)

            def fold(site: str, metrics: dict[str, Any], reply: RecordDict) -> None:
                received = records.arrays(reply)
                bytes_up[site] = payload_nbytes(received)
                try:  # a compressed reply becomes the site's full model again: screening sees every site's update
                    arrays = restore_reply(self.run.update_compression, state.arrays, received)
                except ValueError as exc:
                    unreadable[site] = f"unreadable reply: {exc}"[:300]
                    return
                add(SiteUpdate(site, arrays, int(metrics.get("num-examples", 1))))

            def late(node: str, outstanding: Outstanding, reply: Message) -> None:
                """An earlier round's update, arriving now: dropped or folded (run config late-updates)."""
                staleness = server_round - outstanding.origin_round
                line: dict[str, Any] = {"origin_round": outstanding.origin_round, "staleness": staleness}
                if reply.has_error():
                    late_lines.append(line | {"site": node, "action": "error", "reason": str(reply.error.reason)[:300]})
                    return
                site = str(reply.content["site"]["name"]) if "site" in reply.content else node
                metrics: dict[str, Any] = dict(records.metrics(reply.content))
                if "epsilon" in metrics:  # its budget is spent whatever happens to the update
                    state.epsilon_per_site[site] = float(metrics["epsilon"])
                line["site"] = site
                if self.run.late_updates is LateUpdates.DROP or site in bytes_up:
                    late_lines.append(line | {"action": "dropped"})
                    return
                try:
                    received = restore_reply(
                        self.run.update_compression,
                        self.origins[outstanding.origin_round],
                        records.arrays(reply.content),
                    )
                except (KeyError, ValueError) as exc:
                    late_lines.append(line | {"action": "dropped", "reason": f"unreadable: {exc}"[:300]})
                    return
                examples = int(metrics.get("num-examples", 1))
                weight = staleness_weight(examples, staleness, self.run.staleness_exponent)
                bytes_up[site] = payload_nbytes(records.arrays(reply.content))
                add(SiteUpdate(site, rebase(received, self.origins[outstanding.origin_round], origin), weight))
                late_lines.append(line | {"action": "folded", "examples": examples, "weight": weight})

            replies, errors = self.exchange(
                MessageType.TRAIN,
                content,
                str(server_round),
                fold,
                late=late if self.run.closes_early else None,
                server_round=server_round,
                sample=self.run.sites_per_round,
            )
            if any(o.origin_round == server_round for o in self.outstanding.values()):
                self.origins[server_round] = origin
            folded = [line["site"] for line in late_lines if line["action"] == "folded"]
            readable = len(replies) - len(unreadable) + len(folded)
            if readable < self.min_sites:
                raise QuorumError(f"round {server_round}: {readable} readable update(s), quorum {self.min_sites}")
            try:
                if stream is not None:
                    outcome = stream.outcome()
                else:
                    updates.sort(key=lambda u: u.site)
                    outcome = aggregate(
                        state.arrays,
                        updates,
                        self.run.aggregation,
                        screening=screening,
                        screen_direction=self.screens_direction(server_round),
                    )
            except NothingToAggregateError as exc:  # the round fails; the checkpoint keeps the last global model
                raise QuorumError(f"round {server_round}: {exc}") from exc
        return replies, errors, outcome, bytes_up, late_lines, unreadable

    def _secure_training(self, server_round: int, state: CoordinatorCheckpoint) -> _Training:
        """A training round through SecAgg+ (run config secure-aggregation): the coordinator receives only masked
        updates and learns their weighted mean; no screening is possible, the sum is checked for what it allows."""
        nodes = self.nodes()
        if self.run.sites_per_round:
            nodes = self._sample(nodes, self.run.sites_per_round, f"{server_round}:0")
        self.asked = set(nodes)
        weight_cap = max_weight(state.studies_per_site)
        config = self.config(server_round, state)
        secure = secure_round(self.grid, self.run, server_round, config, state.arrays, nodes, weight_cap, REPLY_POLL_S)
        replies: dict[str, tuple[int, dict[str, Any], RecordDict]] = {}
        bytes_up: dict[str, int] = {}
        for node, reply in sorted(secure.replies.items()):
            site = str(reply.content["site"]["name"]) if "site" in reply.content else f"node-{node}"
            replies[site] = (node, dict(records.metrics(reply.content)), RecordDict())
            bytes_up[site] = secure.masked_bytes(node)
        errors = {f"node-{node}": reason for node, reason in secure.errors.items()}
        for node in sorted(set(nodes) - set(secure.replies)):
            errors.setdefault(f"node-{node}", "no masked update (dropped out of the secure round)")
        if secure.mean_update is None:
            raise QuorumError(f"round {server_round}: secure aggregation could not unmask the sum ({errors})")
        if len(replies) < self.min_sites:  # SecAgg+'s threshold may be lower than the job's quorum
            raise QuorumError(f"round {server_round}: {len(replies)} update(s) in the sum, quorum {self.min_sites}")
        norm = float(np.sqrt(sum(float(np.square(u, dtype=np.float64).sum()) for u in secure.mean_update)))
        if not np.isfinite(norm) or norm > self.run.update_clip_norm * (1 + 1e-3):
            # a mean of updates each clipped to the norm cannot be longer: the sum itself is corrupt
            raise QuorumError(f"round {server_round}: the unmasked mean update's norm {norm:.3g} exceeds the clip")
        aggregated = [a + u for a, u in zip(state.arrays, secure.mean_update, strict=True)]
        say(f"round {server_round}: secure aggregation over {len(replies)} site(s), weights up to {weight_cap}")
        return replies, errors, AggregationOutcome(aggregated, tuple(sorted(replies)), ()), bytes_up, [], {}

    def train_round(self, server_round: int, state: CoordinatorCheckpoint) -> None:
        started, started_cpu = time.perf_counter(), time.thread_time()
        down = int(sum(a.nbytes for a in state.arrays))
        if self.run.secure_aggregation:
            replies, errors, outcome, bytes_up, late_lines, unreadable = self._secure_training(server_round, state)
        else:
            replies, errors, outcome, bytes_up, late_lines, unreadable = self._plain_training(server_round, state)
        errors |= unreadable
        site_lines: dict[str, dict[str, Any]] = {}
        for site, (_, metrics, _) in sorted(replies.items()):
            if site in unreadable:
                continue
            state.studies_per_site[site] = int(metrics.get("num-examples", 0))
            if "epsilon" in metrics:
                state.epsilon_per_site[site] = float(metrics["epsilon"])
            if "lesion_kept" in metrics:
                kept = metrics["lesion_kept"]
                state.lesion_kept_per_site[site] = (
                    [float(v) for v in kept] if isinstance(kept, list) else [],
                    int(metrics.get("lesion_kept_studies", 0)),
                )
            if "lesion_extent_total_mm3" in metrics:
                state.lesion_extent_per_site[site] = (
                    float(metrics.get("lesion_extent_kept_mm3", 0.0)),
                    float(metrics["lesion_extent_total_mm3"]),
                )
            scalars = {k: v for k, v in metrics.items() if not isinstance(v, list) and not k.startswith("eval_")}
            site_lines[site] = scalars | {"bytes_down": down, "bytes_up": bytes_up[site]}  # as sent
        state.arrays, state.server_state = self.server.step(state.arrays, list(outcome.arrays), state.server_state)
        # every site hears of these with its next message (the next round's, or the final evaluation's)
        state.flags += [
            PoisoningAlert(self.run.job, server_round, federation_id(f.site), f.rule) for f in outcome.flags
        ]
        state.completed_round = server_round
        state.save(self.out)
        seconds = time.perf_counter() - started
        compute = max(_compute_seconds(m) for m in site_lines.values())
        append_metrics(
            self.out,
            {
                "round": server_round,
                "seconds": seconds,
                # this thread's CPU time for the round (packing, screening, aggregation; not waiting) and the
                # process's peak resident memory so far: the coordinator's own cost as the federation grows
                "coordinator_cpu_seconds": time.thread_time() - started_cpu,
                "coordinator_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "sites_asked": len(self.asked),
                "site_compute_seconds": compute,
                "overhead_seconds": max(0.0, seconds - compute),
                "overhead_parts": overhead_parts(seconds, site_lines),
                "sites": site_lines,
                "errors": errors,
                "aggregated": list(outcome.used),
                # stragglers: still training when this round closed (round-quorum / round-deadline), and the
                # earlier rounds' updates that arrived during it (late-updates: dropped or folded)
                "stragglers": sorted(
                    f"node-{o.node}" for o in self.outstanding.values() if o.origin_round == server_round
                ),
                "late": late_lines,
                "flagged": [{"site": f.site, "rule": str(f.rule), "reason": f.reason} for f in outcome.flags],
                # the direction rule is off in the schedule's decayed tail (the norm rule always screens)
                "direction_screened": not self.run.secure_aggregation and self.screens_direction(server_round),
                # the global model of the previous round, evaluated by each site before it trained
                "evaluation": evaluation_line({s: m for s, (_, m, _) in replies.items()}),
                "evaluated_round": server_round - 1,
            },
        )
        flagged = "; ".join(f"{f.site}: {f.reason}" for f in outcome.flags) or "none"
        waiting = [o for o in self.outstanding.values() if o.origin_round == server_round]
        late_note = f"; {len(waiting)} still training" if waiting else ""
        late_note += "".join(
            f"; {line['site']} from round {line['origin_round']} {line['action']}" for line in late_lines
        )
        say(
            f"round {server_round}/{self.rounds}: {len(outcome.used)} site(s) aggregated, flagged: {flagged}{late_note}"
        )

    def evaluate_final(
        self, state: CoordinatorCheckpoint, outputs: Outputs
    ) -> tuple[dict[str, Any] | None, dict[str, SiteAudit], PooledSums]:
        """The job's last message to the sites: they evaluate the final model under the artifact's lesion rules
        and, with ``membership-audit``, attack it on their own studies. Returns the pooled evaluation, each
        site's audit and the sites' calibration sums added up."""
        config = self.config(self.rounds, state, outputs)
        content = RecordDict({"arrays": records.pack_arrays(state.arrays), "config": config})
        replies, errors = self.exchange(MessageType.EVALUATE, content, "final")
        site_metrics = {s: m for s, (_, m, _) in replies.items()}
        calibration = PooledSums.of(site_metrics)
        evaluation = evaluation_line(site_metrics)
        if evaluation is not None:  # bias checks: the sites' subgroup cells, pooled
            evaluation["subgroups"] = subgroup_table(site_metrics, self.run.bias_min_cell)
        membership = site_audits(site_metrics)
        append_metrics(
            self.out,
            {
                "stage": "final",
                "evaluated_round": self.rounds,
                "evaluation": evaluation,
                "membership_audit": {"attack": str(self.run.membership_audit), "sites": membership},
                "errors": errors,
                # stragglers whose update was still under way when the last round closed: never aggregated
                "late_never_aggregated": sorted(
                    f"node-{o.node} (round {o.origin_round})" for o in self.outstanding.values()
                ),
            },
        )
        if membership:
            say(
                "membership audit: "
                + "; ".join(f"{site} loss AUC {a.get('loss_auc', float('nan')):.3f}" for site, a in membership.items())
            )
        return evaluation, membership, calibration

    def rollout(self, artifact_folder: Path) -> list[str]:
        files = {name: (artifact_folder / name).read_bytes() for name in (MODEL_FILE, MANIFEST)}
        content = RecordDict({"artifact": ConfigRecord(files), "config": ConfigRecord({})})  # type: ignore[arg-type]
        try:
            replies, errors = self.exchange("query.rollout", content, "rollout")
        except QuorumError as exc:  # the model exists either way; the operator can roll it out again
            replies, errors = {}, {"rollout": str(exc)}
        installed = sorted(replies)
        append_metrics(self.out, {"stage": "rollout", "installed": installed, "errors": errors})
        say(f"rollout: model stored at {', '.join(installed)}" + (f"; failed: {errors}" if errors else ""))
        return installed


def _compute_seconds(site_line: dict[str, Any]) -> float:
    return float(site_line.get("train_seconds", 0)) + float(site_line.get("evaluation_seconds", 0))


def overhead_parts(seconds: float, site_lines: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Where the round's time went outside training, along the site that took longest end to end:
    Flower moving the messages (push, the SuperNode's pickup, the reply), the ClientApp's process from its
    start (or fork, with the warm SuperExec) to our handler, which includes waiting for the message's
    objects, the ClientApp forwarding to the site worker, and the worker's own work around training
    (cohort split, optimiser state, privacy accounting)."""
    if not site_lines:
        return {}
    line = max(
        site_lines.values(),
        key=lambda m: float(m.get("clientapp_start_seconds", 0)) + float(m.get("clientapp_seconds", 0)),
    )
    start, clientapp = float(line.get("clientapp_start_seconds", 0)), float(line.get("clientapp_seconds", 0))
    worker = float(line.get("site_seconds", 0))
    return {
        "flower_transport": max(0.0, seconds - start - clientapp),
        "clientapp_start": start,
        "clientapp_forwarding": max(0.0, clientapp - worker),
        "site_worker_other": max(0.0, worker - _compute_seconds(line)),
    }


def one_network(spec: TaskSpec) -> TaskSpec:
    """The job's spec, refused when it asks for an ensemble: a federated job trains one network (its sites'
    updates average into one set of weights; members would each need their own rounds and privacy budget)."""
    if spec.model.ensemble > 1:
        raise TaskSpecError(
            f"task {spec.name!r} asks for an ensemble of {spec.model.ensemble} networks; a federated job trains "
            "one network (set [model] ensemble = 1, or leave it out, for federated jobs)"
        )
    return spec


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.from_run_config(context.run_config)
    spec = one_network(load_task_spec(run.task or None))
    job = RoundDriver(grid, run, spec.training)
    state = CoordinatorCheckpoint.load(job.out)
    base = load_artifact(Path(run.base_model)) if run.base_model else None
    if state is None or state.plan is None:
        state = CoordinatorCheckpoint(job_instance=secrets.token_hex(8))
        if base is not None:
            spec = job.start_from(base, spec, state)
        else:
            spec = job.plan(spec, state)
            state.arrays = model_to_arrays(new_model(spec, seed=run.seed))
        state.save(job.out)
    else:
        spec = planned_spec(spec, {PLAN_CONFIG_KEY: state.plan})
        say(f"resuming after round {state.completed_round} from {job.out}")
    if run.harmonise and state.harmonisation is None:
        job.harmonise(state)
        state.save(job.out)
    for server_round in range(state.completed_round + 1, job.rounds + 1):
        job.train_round(server_round, state)
    if spec.outputs.min_lesion_fraction is None and state.lesion_kept_per_site:
        # the share-of-largest rule from the sites' summed reference-mask statistics (never a mask)
        spec = spec.with_outputs(min_lesion_fraction=state.lesion_fraction())
    if spec.outputs.min_lesion_slices is None and state.lesion_extent_per_site:
        spec = spec.with_outputs(min_lesion_slices=state.lesion_slices())
    final, membership, sums = job.evaluate_final(state, spec.outputs)
    calibration, default_threshold, calibration_record = None, spec.outputs.lesion_threshold, None
    if final is not None and final["withheld"]:
        say(
            f"evaluation: {', '.join(final['withheld'])} held out fewer than evaluation-min-studies "
            f"({run.evaluation_min_studies}) and sent no figures; the pooled evaluation leaves them out"
        )
    if sums.withheld:
        say(
            f"calibration: {', '.join(sums.withheld)} held out fewer than calibration-min-studies "
            f"({run.calibration_min_studies}) and sent no sums"
            + ("" if sums.total is not None else "; no site did, so the spec's output settings stay")
        )
    if sums.total is not None and spec.training.calibrate:
        # threshold, minimum size, share of the largest and study temperature from every site's held-out sums
        before = spec.outputs
        calibration = sums.total.calibration(before.min_lesion_volume_mm3, before.lesion_fraction)
        calibration_record = calibration.as_dict() | {
            "before": {  # the settings the sites evaluated under (the share: from their reference masks)
                "lesion_threshold": before.lesion_threshold,
                "min_lesion_volume_mm3": before.min_lesion_volume_mm3,
                "min_lesion_fraction": before.lesion_fraction,
                "study_temperature": before.study_temperature,
            },
            "withheld_sites": list(sums.withheld),
            "min_studies": run.calibration_min_studies,
        }
        spec = calibration.applied_to(spec)
        append_metrics(job.out, {"stage": "calibration", **calibration_record})
        say(
            f"calibration on {calibration.studies} held-out studies: threshold {calibration.lesion_threshold:g}, "
            f"minimum volume {calibration.min_lesion_volume_mm3:g} mm3, share of largest "
            f"{calibration.min_lesion_fraction:g}, study temperature {calibration.study_temperature:.3g} "
            f"(mean Dice {calibration.validation_dice:.3f}; {calibration.reference_dice:.3f} at the spec's settings)"
        )
    epsilon, delta = run.epsilon, run.delta
    alerts = state.alerts(run.anonymise_alerts)
    artifact = export_artifact(
        arrays_to_model(spec, state.arrays),
        spec,
        job.out / "artifact",
        ModelIdentity(spec.name, run.model_version),
        harmonisation=state.harmonisation,
        provenance={
            "training": "federated",
            "job": run.job,
            "rounds": run.num_server_rounds,
            "local_steps": run.local_steps,
            "aggregation": str(run.aggregation),
            "secure_aggregation": {"update_clip_norm": run.update_clip_norm} if run.secure_aggregation else None,
            "server_learning_rate": run.server_learning_rate,
            "server_momentum": run.server_momentum,
            "server_optimizer": str(run.server_optimizer),
            "proximal_mu": run.proximal_mu,
            "base_model": {"key": base.key, **{k: base.provenance.get(k) for k in ("steps", "studies_per_site")}}
            if base is not None
            else None,
            "studies_per_site": state.studies_per_site,
            "differential_privacy": {"epsilon_budget": epsilon, "delta": delta, "epsilon_spent": state.epsilon_per_site}
            if epsilon > 0
            else None,
            "validation": final,
            "calibration": calibration_record,
            "membership_audit": {"attack": str(run.membership_audit), "sites": membership},
            PROVENANCE_KEY: [a.as_dict() for a in alerts],  # a node may refuse the model while these are open
        },
    )
    card = model_card(
        job=run.job,
        model_key=artifact.key,
        rounds=run.num_server_rounds,
        local_steps=run.local_steps,
        aggregation=str(run.aggregation),
        state=state,
        epsilon_budget=epsilon,
        delta=delta,
        final_evaluation=final,
        base_model=f"{base.key}, trained {base.provenance.get('steps')} steps on "
        f"{sum((base.provenance.get('studies_per_site') or {}).values())} public studies"
        if base is not None
        else None,
        alerts=alerts,
        sections=[
            calibration_section(calibration, default_threshold, sums.withheld, run.calibration_min_studies),
            secure_section(run),
            card_section(membership, run.membership_audit, epsilon),
            bias_section((final or {}).get("subgroups"), run.bias_min_cell),
        ],
    )
    (job.out / "model-card.md").write_text(card)
    say(f"artifact {artifact.key} written to {job.out / 'artifact'} (sha256 {artifact.sha256[:12]})")
    if run.rollout:
        job.rollout(artifact.folder)
