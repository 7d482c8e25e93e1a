"""Where a node lives, as its TOML file says: the Orthanc it serves, its state and models folders, and how it
shares its device. Both readers of that file own these keys here: the node (``plugin/node/config.py``) and the
federated site beside it (``federation/site/config.py``, whose SuperNode ``--node-config`` may name the file
instead of repeating its values). Environment variables override the file, the same for both."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radfed.inference.errors import RadfedError
from radfed.inference.model.arbiter import DevicePolicy

DEFAULT_ORTHANC_URL = "http://127.0.0.1:8042"
DEFAULT_STATE_DIR = "/var/lib/radfed"
ORTHANC_URL_ENV = "RADFED_ORTHANC_URL"
ORTHANC_PASSWORD_ENV = "RADFED_ORTHANC_PASSWORD"
STATE_DIR_ENV = "RADFED_STATE_DIR"
MODELS_DIR_ENV = "RADFED_MODELS_DIR"


class NodeFileError(RadfedError, ValueError):
    """The node's TOML file cannot be read or holds a value of the wrong kind; the message names the key."""


def read_node_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise NodeFileError(f"cannot read {path}: {exc}") from exc


def setting(table: Mapping[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    """``table[key]`` checked to be a ``kind`` (an int is a float where a float is asked), else ``default``."""
    if key not in table:
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise NodeFileError(f"{where}.{key} must be {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class NodeLocations:
    orthanc_url: str  # as written: may carry the user, never printed
    orthanc_username: str | None
    orthanc_password: str | None = field(repr=False)
    state_dir: Path
    models_dir: Path
    device_policy: DevicePolicy

    @classmethod
    def from_file_data(cls, data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> NodeLocations:
        env = os.environ if environ is None else environ
        orthanc = data.get("orthanc", {})
        node = data.get("node", {})
        state_dir = Path(env.get(STATE_DIR_ENV) or setting(node, "state_dir", str, DEFAULT_STATE_DIR, "node"))
        models_dir = env.get(MODELS_DIR_ENV) or setting(node, "models_dir", str, str(state_dir / "models"), "node")
        policy = setting(node, "device_policy", str, DevicePolicy.CLINICAL_FIRST.value, "node")
        try:
            device_policy = DevicePolicy(policy)
        except ValueError:
            choices = ", ".join(p.value for p in DevicePolicy)
            raise NodeFileError(f"node.device_policy must be one of {choices}, got {policy!r}") from None
        return cls(
            orthanc_url=env.get(ORTHANC_URL_ENV) or setting(orthanc, "url", str, DEFAULT_ORTHANC_URL, "orthanc"),
            orthanc_username=setting(orthanc, "username", str, None, "orthanc"),
            orthanc_password=env.get(ORTHANC_PASSWORD_ENV) or setting(orthanc, "password", str, None, "orthanc"),
            state_dir=state_dir,
            models_dir=Path(models_dir),
            device_policy=device_policy,
        )

    @classmethod
    def read(cls, path: Path, environ: Mapping[str, str] | None = None) -> NodeLocations:
        return cls.from_file_data(read_node_file(path), environ)
