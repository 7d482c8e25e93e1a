"""Poisoning alerts: when the coordinator's screening flags a site's update, every site of the job hears of it.

The coordinator sends every flag of the job so far in each message's config (``poisoning-alerts``: a JSON list of
entries with only ``learning.messages.ALERT_FIELDS``: round, site, rule), so a site that missed a round still learns of
it, and the final model's provenance and model card list them all. A job whose run config says
``anonymise-alerts = true`` names flagged sites by pseudonyms (``flagged-site-1``, ... in the order they were
first flagged): the hospitals learn that an update was flagged, by which rule and when, not whose.

A site keeps what it received in an ``AlertStore`` in its node's state folder (node-config ``node-state-dir``);
the node shows it (``GET /federation/alerts``, Orthanc Explorer, ``/metrics``), its admin resolves an alert once
reviewed, and with ``refuse_flagged_models`` the node will not activate a model whose job has unresolved alerts.
Light on purpose (no torch, no flwr): the node process imports it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from radfed.federation.learning.aggregation import AnomalyRule
from radfed.federation.learning.messages import ALERT_FIELDS, SITE_ID, AlertLeakError, allowed_alert
from radfed.inference.errors import RadfedError

ALERTS_CONFIG_KEY = "poisoning-alerts"  # in a round's config, beside the run-config keys
PROVENANCE_KEY = "poisoning_alerts"  # in a federated model's provenance: every flag of its job
ALERT_FILE = "federation-alerts.json"
PSEUDONYM_PREFIX = "flagged-site-"


@dataclass(frozen=True)
class PoisoningAlert:
    """One flag of the coordinator's screening: in job ``job``, round ``server_round``, the update of ``site``
    (a federation id or pseudonym) broke ``rule`` and was left out of that round's aggregation."""

    job: str
    server_round: int
    site: str
    rule: AnomalyRule

    def __post_init__(self) -> None:
        allowed_alert(self.message_entry())  # the same checks whether made here or read from a message
        object.__setattr__(self, "rule", AnomalyRule(self.rule))

    @property
    def alert_id(self) -> str:
        """Stable across sites and restarts: the same flag has the same id at every node."""
        key = json.dumps([self.job, self.server_round, self.site, str(self.rule)])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def message_entry(self) -> dict[str, int | str]:
        """What a round's config carries (the job is the config's own ``job`` key)."""
        return {"round": self.server_round, "site": self.site, "rule": str(self.rule)}

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.alert_id, "job": self.job, **self.message_entry()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoisoningAlert:
        """From ``as_dict`` (a provenance entry or the store); the entry's fields pass the allow-list."""
        job = data.get("job")
        if not isinstance(job, str) or not job:
            raise AlertLeakError(f"a poisoning alert needs its job's name, got {job!r}")
        entry = allowed_alert({k: data[k] for k in ALERT_FIELDS if k in data})
        return cls(job, int(entry["round"]), str(entry["site"]), AnomalyRule(str(entry["rule"])))


def federation_id(site_name: str) -> str:
    """A site's name as alerts carry it: as is when it is an id (``learning.messages.SITE_ID``), else a hash of it (a
    site-name with spaces or other text must not make the coordinator fail, nor travel as free text)."""
    if SITE_ID.fullmatch(site_name):
        return site_name
    return "site-" + hashlib.sha256(site_name.encode()).hexdigest()[:12]


def alerts_to_config(alerts: Sequence[PoisoningAlert]) -> str:
    return json.dumps([a.message_entry() for a in alerts], separators=(",", ":"))


def alerts_from_config(text: str, job: str) -> tuple[PoisoningAlert, ...]:
    """Parse a round config's ``poisoning-alerts``; an entry outside the allow-list raises ``AlertLeakError``."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AlertLeakError(f"{ALERTS_CONFIG_KEY} is not JSON: {exc}") from None
    if not isinstance(entries, list):
        raise AlertLeakError(f"{ALERTS_CONFIG_KEY} must be a list, got {type(entries).__name__}")
    checked = [allowed_alert(entry) for entry in entries]
    return tuple(PoisoningAlert(job, int(e["round"]), str(e["site"]), AnomalyRule(str(e["rule"]))) for e in checked)


def pseudonymised(alerts: Sequence[PoisoningAlert]) -> tuple[PoisoningAlert, ...]:
    """The same alerts with each site named ``flagged-site-N``, N by the order sites were first flagged (so a
    site flagged round after round stays recognisable as one site)."""
    names: dict[str, str] = {}
    for alert in sorted(alerts, key=lambda a: a.server_round):
        names.setdefault(alert.site, f"{PSEUDONYM_PREFIX}{len(names) + 1}")
    return tuple(replace(a, site=names[a.site]) for a in alerts)


def provenance_alerts(provenance: Mapping[str, Any]) -> tuple[PoisoningAlert, ...]:
    """Every flag of the job a model was trained in (none for a model without federated provenance)."""
    entries = provenance.get(PROVENANCE_KEY) or []
    if not isinstance(entries, list):
        raise AlertLeakError(f"provenance {PROVENANCE_KEY} must be a list")
    return tuple(PoisoningAlert.from_dict(e) for e in entries)


@dataclass(frozen=True)
class ReceivedAlert:
    alert: PoisoningAlert
    received_at: str  # ISO 8601, UTC
    resolved_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return self.alert.as_dict() | _store_fields(self) | {"resolved": self.resolved_at is not None}


class UnresolvedAlertsError(RadfedError, ValueError):
    """The node refuses a model whose job has poisoning alerts its admin has not resolved."""


class AlertStore:
    """A node's poisoning alerts (``<state folder>/federation-alerts.json``): written by the site worker as
    messages arrive, read and resolved by the node process; every change under a file lock, replaced atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / ALERT_FILE

    def alerts(self) -> list[ReceivedAlert]:
        return self._read()

    def record(self, alerts: Iterable[PoisoningAlert]) -> list[ReceivedAlert]:
        """Keep the alerts not seen before; returns those."""
        with self._changing() as stored:
            known = {r.alert.alert_id for r in stored}
            now = _now()
            new = [ReceivedAlert(a, now) for a in dict.fromkeys(alerts) if a.alert_id not in known]
            stored.extend(new)
        return new

    def resolve(self, alert_id: str) -> ReceivedAlert | None:
        """Mark an alert resolved (its admin reviewed it); None when the node has no such alert."""
        with self._changing() as stored:
            for index, received in enumerate(stored):
                if received.alert.alert_id == alert_id:
                    if received.resolved_at is None:
                        stored[index] = replace(received, resolved_at=_now())
                    return stored[index]
        return None

    def require_resolved(self, alerts: Sequence[PoisoningAlert], what: str) -> None:
        """Raise ``UnresolvedAlertsError`` naming every alert of ``alerts`` not resolved here. A model can bring
        flags this node never received (it was not in the job, or was offline): they are recorded first, so the
        admin sees them in ``/federation/alerts`` and can resolve them."""
        if not alerts:
            return
        self.record(alerts)
        resolved = {r.alert.alert_id for r in self._read() if r.resolved_at is not None}
        open_ = [a for a in alerts if a.alert_id not in resolved]
        if open_:
            listed = "; ".join(f"{a.alert_id}: round {a.server_round}, site {a.site}, rule {a.rule}" for a in open_)
            raise UnresolvedAlertsError(
                f"{what} was trained in job {open_[0].job!r} with {len(open_)} unresolved poisoning alert(s) "
                f"({listed}); this node refuses it (node.refuse_flagged_models). Review them, then "
                "POST /federation/alerts/<id>/resolve"
            )

    def _read(self) -> list[ReceivedAlert]:
        if not self.path.is_file():
            return []
        return [
            ReceivedAlert(PoisoningAlert.from_dict(d), str(d["received_at"]), d.get("resolved_at"))
            for d in json.loads(self.path.read_text())
        ]

    @contextlib.contextmanager
    def _changing(self) -> Iterator[list[ReceivedAlert]]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / (ALERT_FILE + ".lock")).open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the site worker and the node process write here
            stored = self._read()
            yield stored
            partial = self.path.with_name(ALERT_FILE + ".partial")
            partial.write_text(json.dumps([r.alert.as_dict() | _store_fields(r) for r in stored], indent=1))
            os.replace(partial, self.path)


def _store_fields(received: ReceivedAlert) -> dict[str, Any]:
    return {"received_at": received.received_at, "resolved_at": received.resolved_at}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
