"""A site's settings from its SuperNode's ``--node-config``; light enough for the ClientApp process
(no torch), which only forwards messages to the site worker."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from radfed.inference.model.arbiter import DeviceArbiter, DevicePolicy
from radfed.inference.node_file import ORTHANC_PASSWORD_ENV, NodeFileError, NodeLocations


@dataclass(frozen=True)
class SiteConfig:
    """From the SuperNode's ``--node-config`` (set by the hospital's admin, never by the coordinator)."""

    name: str
    data: tuple[str, ...] = field(repr=False)  # folders and/or Orthanc URLs (the password is injected: never print)
    state_dir: Path
    labels: Path | None = None
    models_dir: Path | None = None  # the node's model registry, where a rolled-out model is stored
    # the node's state folder: training yields the device to the node's clinical jobs (inference/model/arbiter.py)
    node_state_dir: Path | None = None
    device_policy: DevicePolicy = DevicePolicy.CLINICAL_FIRST

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> SiteConfig:
        """The site's settings; with ``node-toml`` (the path of the node's TOML file) the node's Orthanc, models
        folder, state folder (so training yields the device to its clinical jobs) and device policy come from
        that file, and a key given here as well overrides it."""
        node = _node_file(node_config.get("node-toml"))
        password = os.environ.get(ORTHANC_PASSWORD_ENV, "") or (node.orthanc_password or "" if node else "")
        sources = str(node_config.get("data", "")) or (_orthanc_source(node) if node else "")
        data = tuple(_with_password(s, password) for s in sources.split(",") if s)
        if not data:
            raise ValueError("node-config 'data' (folders or Orthanc URLs, comma separated) or 'node-toml' is required")
        labels = node_config.get("labels")
        models = node_config.get("models-dir") or (node.models_dir if node else None)
        node_state = node_config.get("node-state-dir") or (node.state_dir if node else None)
        default_policy = node.device_policy if node else DevicePolicy.CLINICAL_FIRST
        try:
            policy = DevicePolicy(str(node_config.get("device-policy", default_policy.value)))
        except ValueError:
            choices = ", ".join(p.value for p in DevicePolicy)
            raise ValueError(f"node-config 'device-policy' must be one of {choices}") from None
        default_state = node.state_dir / "site" if node else Path("radfed-site-state")
        return cls(
            name=str(node_config.get("site-name", "site")),
            data=data,
            state_dir=Path(str(node_config.get("state-dir", default_state))),
            labels=Path(str(labels)) if labels else None,
            models_dir=Path(str(models)) if models else None,
            node_state_dir=Path(str(node_state)) if node_state else None,
            device_policy=policy,
        )

    def arbiter(self) -> DeviceArbiter | None:
        """The device arbiter shared with the node beside this site (None: no node named)."""
        return DeviceArbiter(self.node_state_dir, self.device_policy) if self.node_state_dir else None

    def job_dir(self, job: str) -> Path:
        """What the site keeps under a job's name across its runs: the privacy accountant (a job run again
        under its name spends the same budget)."""
        return self.state_dir / "jobs" / hashlib.sha256(job.encode()).hexdigest()[:16]

    def run_dir(self, job: str, instance: str) -> Path:
        """What the site keeps for one run of a job (optimiser state, last reply, compression residual, starting
        model): a new run under an old name starts afresh; a resumed run keeps its instance. Without an instance
        (a coordinator before it) the job's own folder."""
        folder = self.job_dir(job)
        return folder / "runs" / hashlib.sha256(instance.encode()).hexdigest()[:16] if instance else folder


def _node_file(path: object) -> NodeLocations | None:
    if not path:
        return None
    try:
        return NodeLocations.read(Path(str(path)))
    except NodeFileError as exc:
        raise ValueError(f"node-config 'node-toml': {exc}") from None


def _orthanc_source(node: NodeLocations) -> str:
    """The node's Orthanc URL with its user (the password is added from the environment or the file)."""
    parts = urlsplit(node.orthanc_url)
    user = parts.username or node.orthanc_username
    if not user or parts.scheme not in ("http", "https"):
        return node.orthanc_url
    netloc = f"{quote(user, safe='')}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _with_password(source: str, password: str) -> str:
    """Orthanc URLs in the node config carry the user only; the password comes from the environment
    (RADFED_ORTHANC_PASSWORD) so that it never appears in Flower's configuration or logs."""
    parts = urlsplit(source)
    if not password or parts.scheme not in ("http", "https") or not parts.username or parts.password:
        return source
    netloc = f"{parts.username}:{quote(password, safe='')}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
