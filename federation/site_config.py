"""A site's settings from its SuperNode's ``--node-config``; light enough for the ClientApp process
(no torch), which only forwards messages to the site worker."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from radfed.inference.arbiter import DeviceArbiter, DevicePolicy

ORTHANC_PASSWORD_ENV = "RADFED_ORTHANC_PASSWORD"


@dataclass(frozen=True)
class SiteConfig:
    """From the SuperNode's ``--node-config`` (set by the hospital's admin, never by the coordinator)."""

    name: str
    data: tuple[str, ...] = field(repr=False)  # folders and/or Orthanc URLs (the password is injected: never print)
    state_dir: Path
    labels: Path | None = None
    models_dir: Path | None = None  # the node's model registry, where a rolled-out model is stored
    # the node's state folder: training yields the device to the node's clinical jobs (inference/arbiter.py)
    node_state_dir: Path | None = None
    device_policy: DevicePolicy = DevicePolicy.CLINICAL_FIRST

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> SiteConfig:
        password = os.environ.get(ORTHANC_PASSWORD_ENV, "")
        data = tuple(_with_password(s, password) for s in str(node_config.get("data", "")).split(",") if s)
        if not data:
            raise ValueError("node-config 'data' (folders or Orthanc URLs, comma separated) is required")
        labels = node_config.get("labels")
        models = node_config.get("models-dir")
        node_state = node_config.get("node-state-dir")
        try:
            policy = DevicePolicy(str(node_config.get("device-policy", DevicePolicy.CLINICAL_FIRST.value)))
        except ValueError:
            choices = ", ".join(p.value for p in DevicePolicy)
            raise ValueError(f"node-config 'device-policy' must be one of {choices}") from None
        return cls(
            name=str(node_config.get("site-name", "site")),
            data=data,
            state_dir=Path(str(node_config.get("state-dir", "radfed-site-state"))),
            labels=Path(str(labels)) if labels else None,
            models_dir=Path(str(models)) if models else None,
            node_state_dir=Path(str(node_state)) if node_state else None,
            device_policy=policy,
        )

    def arbiter(self) -> DeviceArbiter | None:
        """The device arbiter shared with the node beside this site (None: no node named)."""
        return DeviceArbiter(self.node_state_dir, self.device_policy) if self.node_state_dir else None

    def job_dir(self, job: str) -> Path:
        return self.state_dir / "jobs" / hashlib.sha256(job.encode()).hexdigest()[:16]


def _with_password(source: str, password: str) -> str:
    """Orthanc URLs in the node config carry the user only; the password comes from the environment
    (RADFED_ORTHANC_PASSWORD) so that it never appears in Flower's configuration or logs."""
    parts = urlsplit(source)
    if not password or parts.scheme not in ("http", "https") or not parts.username or parts.password:
        return source
    netloc = f"{parts.username}:{quote(password, safe='')}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
