"""The node's TOML file as a schema: every section and key, its type, default and meaning, in one place.

``load_config`` (plugin/node/config.py) validates the file against it after applying environment overrides: any key
as ``RADFED_<SECTION>__<KEY>`` (``RADFED_NODE__CONCURRENCY=4``; a value is read as JSON when it parses, e.g.
``RADFED_SCP__ALLOWED_AETS='["PACS"]'``), plus the short names documented before the schema existed
(``RADFED_ORTHANC_URL``, ``RADFED_API_TOKEN``, ...). ``radfed config schema`` prints it as JSON Schema. Unknown
keys are refused (a misspelt key used to be ignored silently). The keys the federated site beside the node reads
too (Orthanc, folders, device policy) take their defaults from ``inference/node_file.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictBool, StrictFloat, StrictInt, ValidationError

from radfed.inference.model.arbiter import DevicePolicy
from radfed.inference.model.device import Device, RuntimeSettings
from radfed.inference.node_file import DEFAULT_ORTHANC_URL, DEFAULT_STATE_DIR
from radfed.plugin.node.ledger.store import DEFAULT_LEASE_S

ENV_PREFIX = "RADFED_"
NESTED = "__"
# short names kept from before the schema: (section, key)
SHORT_ENV = {
    "RADFED_ORTHANC_URL": ("orthanc", "url"),
    "RADFED_ORTHANC_PASSWORD": ("orthanc", "password"),
    "RADFED_STATE_DIR": ("node", "state_dir"),
    "RADFED_MODELS_DIR": ("node", "models_dir"),
    "RADFED_DATABASE_URL": ("node", "database_url"),
    "RADFED_API_TOKEN": ("api", "token"),
    "RADFED_API_PORT": ("api", "port"),
    "RADFED_DEVICE": ("inference", "device"),
}
_RUNTIME = RuntimeSettings()


class NodeRole(StrEnum):
    """What one ``radfed serve`` process does: follow Orthanc and examine (coordinator), run jobs (worker), or both."""

    COORDINATOR = "coordinator"
    WORKER = "worker"
    ALL = "all"


class Destination(StrEnum):
    ORTHANC_REST = "orthanc-rest"
    DICOMWEB = "dicomweb"
    CSTORE = "cstore"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrthancSection(_Section):
    url: str = Field(DEFAULT_ORTHANC_URL, description="Orthanc's REST API (may carry the user: http://USER@HOST:PORT)")
    username: str | None = Field(None, description="an Orthanc RegisteredUsers entry for the node")
    password: SecretStr | None = Field(None, description="secret: better RADFED_ORTHANC_PASSWORD")


class NodeSection(_Section):
    state_dir: Path = Field(Path(DEFAULT_STATE_DIR), description="ledger, models, backups, arbiter locks")
    models_dir: Path | None = Field(None, description="the model registry (default: <state_dir>/models)")
    concurrency: StrictInt = Field(2, ge=1, description="jobs in parallel (bounds memory)")
    poll_interval_s: StrictFloat = Field(1.0, gt=0, description="/changes polling")
    retry_base_s: StrictFloat = Field(2.0, gt=0, description="backoff while Orthanc is unreachable")
    retry_max_s: StrictFloat = Field(60.0, gt=0)
    max_attempts: StrictInt = Field(50, ge=1, description="attempts while Orthanc is unreachable before a job fails")
    onnx_threads: StrictInt | None = Field(None, ge=1, description="ONNX Runtime intra-op threads (default: its own)")
    prefetch: StrictBool = Field(True, description="prepare arriving studies before StableStudy")
    prefetch_quiet_s: StrictFloat = Field(0.5, ge=0)
    prefetch_studies: StrictInt = Field(4, ge=1, description="prepared studies held in memory at most")
    ledger_backup_interval_s: StrictFloat = Field(3600.0, ge=0, description="online ledger copies (0: none)")
    ledger_backups: StrictInt = Field(24, ge=0)
    reconcile_quiet_s: StrictFloat = Field(180.0, gt=0, description="a changed study quiet this long is examined")
    reconcile_interval_s: StrictFloat = Field(30.0, gt=0)
    device_policy: DevicePolicy = Field(DevicePolicy.CLINICAL_FIRST, description="clinical jobs before training")
    refuse_flagged_models: StrictBool = Field(False, description="never activate a model with unresolved alerts")
    database_url: SecretStr | None = Field(None, description="secret: postgresql+psycopg://... (default SQLite)")
    role: NodeRole = Field(NodeRole.ALL, description="what radfed serve runs (several workers need PostgreSQL)")
    lease_s: StrictFloat = Field(DEFAULT_LEASE_S, description="a job whose lease is not renewed this long runs again")


class ApiSection(_Section):
    host: str = "127.0.0.1"
    port: StrictInt = Field(8700, ge=1, le=65535)
    token: SecretStr | None = Field(None, description="secret, required: better RADFED_API_TOKEN")


class CStoreSection(_Section):
    host: str = "127.0.0.1"
    port: StrictInt = Field(104, ge=1, le=65535)
    called_aet: str = "ORTHANC"
    calling_aet: str = "RADFED"


class OutputSection(_Section):
    destination: Destination = Destination.ORTHANC_REST
    dicomweb_url: str | None = Field(None, description="STOW-RS target (default: Orthanc's /dicom-web)")
    cstore: CStoreSection | None = Field(None, description="when destination = cstore")
    seg_encoding: str = Field("BINARY", description="BINARY (every viewer) | LABELMAP")
    key_images: StrictBool = Field(False, description="also store Secondary Capture key images")


class ScpSection(_Section):
    enabled: StrictBool = False
    port: StrictInt | None = Field(None, description="required when enabled")
    aet: str = "RADFED"
    host: str = Field("127.0.0.1", description="interface address to bind (0.0.0.0 or :: for all)")
    allowed_aets: list[str] = Field(default_factory=list, description="calling AE titles let in; [] = any")
    allowed_peers: list[str] = Field(default_factory=list, description="peer addresses or networks; [] = any")


class InferenceSection(_Section):
    device: Device = Field(_RUNTIME.device, description="cpu | cuda | auto")
    device_id: StrictInt = Field(_RUNTIME.device_id, ge=0)
    gpu_mem_limit_mb: StrictInt | None = Field(_RUNTIME.gpu_mem_limit_mb, gt=0)
    tensorrt: StrictBool = _RUNTIME.tensorrt
    batch_windows: StrictInt = Field(_RUNTIME.batch_windows, ge=1, description="sliding windows per ONNX run")
    warmup: StrictBool = _RUNTIME.warmup
    fp16: StrictBool = _RUNTIME.fp16


class NodeSettings(_Section):
    """A radfed node's configuration file (radfed serve --config FILE)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="radfed node configuration")

    orthanc: OrthancSection = OrthancSection()
    node: NodeSection = NodeSection()
    api: ApiSection = ApiSection()
    output: OutputSection = OutputSection()
    scp: ScpSection = ScpSection()
    inference: InferenceSection = InferenceSection()


class SettingsError(ValueError):
    """The file or the environment holds a value the schema refuses; the message names each key."""


def with_environment(data: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The file's tables with the environment's overrides applied (the environment wins)."""
    merged: dict[str, Any] = {section: dict(table) for section, table in data.items() if isinstance(table, dict)}
    merged.update({k: v for k, v in data.items() if not isinstance(v, dict)})
    sections = set(NodeSettings.model_fields)
    for name, raw in environ.items():
        if name in SHORT_ENV:
            section, key = SHORT_ENV[name]
        elif name.startswith(ENV_PREFIX) and NESTED in name:
            section, _, key = name.removeprefix(ENV_PREFIX).lower().partition(NESTED)
            if section not in sections:
                continue  # another RADFED_ variable (the bench's, the site's)
        else:
            continue
        if raw == "":
            continue  # an unset secret in a compose file: the file's value stands
        merged.setdefault(section, {})[key] = _env_value(raw, section, key)
    return merged


def _env_value(raw: str, section: str, key: str) -> Any:
    """An environment value as the file would hold it: text for text, paths and secrets (a password of digits
    stays text), else JSON (4, 1.5, true, ["PACS"]) where it parses."""
    table = NodeSettings.model_fields[section].annotation
    field = table.model_fields.get(key) if isinstance(table, type) and issubclass(table, BaseModel) else None
    if field is None or _is_text(field.annotation):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _is_text(annotation: Any) -> bool:
    """str, a path or a secret, optional or not (a list of str is not text)."""
    kinds = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    return bool(kinds & {str, SecretStr, Path})


def validate_settings(data: Mapping[str, Any]) -> NodeSettings:
    try:
        return NodeSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError("; ".join(_problem(error) for error in exc.errors())) from None


def _problem(error: Any) -> str:
    """One refused value in the words of the file: the key, what it must be, what it was."""
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key} is not a radfed node setting (misspelt? `radfed config schema` lists them)"
    if error["type"] == "enum":
        choices = ", ".join(re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", ""))))
        return f"{key} must be one of {choices}, got {error['input']!r}"
    return f"{key}: {error['msg'][0].lower()}{error['msg'][1:]}, got {error['input']!r}"


def settings_schema() -> dict[str, Any]:
    return NodeSettings.model_json_schema()
