"""Node configuration: a TOML file, with environment variables for secrets and overrides.

Read once, at the edge (``radfed serve``), and passed down as a frozen object. Secrets are never part
of ``repr`` and never logged.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from radfed.inference.arbiter import DevicePolicy
from radfed.inference.device import Device, RuntimeSettings
from radfed.inference.errors import RadfedError
from radfed.inference.node_file import NodeFileError, NodeLocations, read_node_file, setting
from radfed.inference.orthanc.client import OrthancEndpoint
from radfed.plugin.ledger import DEFAULT_LEASE_S


class ConfigError(RadfedError, ValueError):
    """The node configuration is invalid; the message names the setting."""


class NodeRole(StrEnum):
    """What one ``radfed serve`` process does: follow Orthanc and examine (coordinator), run jobs (worker), or both."""

    COORDINATOR = "coordinator"
    WORKER = "worker"
    ALL = "all"


class Destination(StrEnum):
    ORTHANC_REST = "orthanc-rest"
    DICOMWEB = "dicomweb"
    CSTORE = "cstore"


@dataclass(frozen=True)
class CStoreTarget:
    host: str
    port: int
    called_aet: str
    calling_aet: str = "RADFED"


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ScpSettings:
    """The node's DICOM Storage SCP (``[scp]``): where it listens and whom it lets in.

    Empty allow-lists let in every calling AE title, every peer that reaches ``host``.
    """

    port: int
    ae_title: str = "RADFED"
    host: str = "127.0.0.1"  # an interface address; 0.0.0.0 (or ::) for every interface
    allowed_aets: frozenset[str] = frozenset()
    allowed_peers: tuple[IPNetwork, ...] = ()  # single addresses are /32 (/128) networks


@dataclass(frozen=True)
class NodeConfig:
    orthanc: OrthancEndpoint
    state_dir: Path
    models_dir: Path
    concurrency: int = 2
    poll_interval_s: float = 1.0
    retry_base_s: float = 2.0
    retry_max_s: float = 60.0
    max_attempts: int = 50  # attempts while Orthanc is unreachable before a job fails
    api_host: str = "127.0.0.1"
    api_port: int = 8700
    api_token: str = field(default="", repr=False)
    destination: Destination = Destination.ORTHANC_REST
    dicomweb_url: str | None = None
    cstore: CStoreTarget | None = None
    seg_encoding: str = "BINARY"
    key_images: bool = False
    scp: ScpSettings | None = None  # a Storage SCP runs when [scp] enabled = true
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)  # [inference]: device, batching, warm-up
    prefetch: bool = True  # prepare arriving studies before StableStudy (plugin/prefetch.py)
    prefetch_quiet_s: float = 0.5
    prefetch_studies: int = 4
    ledger_backup_interval_s: float = 3600.0  # online copies of the ledger (0: none)
    ledger_backups: int = 24  # how many copies stay
    # A study that changed and then stayed quiet this long without StableStudy is examined (Orthanc's StableAge
    # defaults to 60 s; its stability events are lost when it crashes).
    reconcile_quiet_s: float = 180.0
    reconcile_interval_s: float = 30.0
    device_policy: DevicePolicy = DevicePolicy.CLINICAL_FIRST  # clinical jobs before a site's training
    # refuse to activate a model whose federated job has poisoning alerts the admin has not resolved
    refuse_flagged_models: bool = False
    # The ledger's database: None for <state>/ledger.sqlite, or a URL (postgresql+psycopg://USER:PASSWORD@HOST/DB)
    database_url: str | None = field(default=None, repr=False)
    role: NodeRole = NodeRole.ALL  # radfed serve --role; several workers need a shared ledger (PostgreSQL)
    lease_s: float = DEFAULT_LEASE_S  # heartbeats renew a running job's lease; unrenewed, it is run again

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    @property
    def ledger_location(self) -> Path | str:
        """What :class:`~radfed.plugin.ledger.Ledger` opens: the URL when set, else the SQLite file."""
        return self.database_url or self.ledger_path

    @property
    def backup_dir(self) -> Path:
        return self.state_dir / "backups"


def _get(table: Mapping[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    try:
        return setting(table, key, kind, default, where)
    except NodeFileError as exc:
        raise ConfigError(str(exc)) from None


def _runtime_settings(
    table: Mapping[str, Any], threads: int | None, state_dir: Path, device: str | None
) -> RuntimeSettings:
    """``[inference]``: the wanted device (``RADFED_DEVICE`` overrides it), GPU options, windows per run."""
    defaults = RuntimeSettings()
    wanted = device or _get(table, "device", str, defaults.device.value, "inference")
    try:
        chosen = Device(wanted)
    except ValueError:
        raise ConfigError(
            f"inference.device must be one of {', '.join(d.value for d in Device)}, got {wanted!r}"
        ) from None
    device_id = _get(table, "device_id", int, defaults.device_id, "inference")
    limit = _get(table, "gpu_mem_limit_mb", int, defaults.gpu_mem_limit_mb, "inference")
    batch = _get(table, "batch_windows", int, defaults.batch_windows, "inference")
    if device_id < 0 or (limit is not None and limit <= 0) or batch < 1:
        raise ConfigError("inference.device_id must be >= 0, gpu_mem_limit_mb > 0 and batch_windows >= 1")
    return RuntimeSettings(
        device=chosen,
        device_id=device_id,
        gpu_mem_limit_mb=limit,
        tensorrt=_get(table, "tensorrt", bool, defaults.tensorrt, "inference"),
        engine_cache_dir=state_dir / "tensorrt-engines",
        batch_windows=batch,
        warmup=_get(table, "warmup", bool, defaults.warmup, "inference"),
        fp16=_get(table, "fp16", bool, defaults.fp16, "inference"),
        intra_op_threads=threads,
    )


def _seg_encoding(value: str) -> str:
    if value not in ("BINARY", "LABELMAP"):
        raise ConfigError(f"output.seg_encoding must be BINARY or LABELMAP, got {value!r}")
    return value


def _ae_title(value: str, where: str) -> str:
    """An AE title as PS3.5 6.2 allows it: 1 to 16 characters of printable ASCII but backslash, not all spaces."""
    title = value.strip()
    if not 0 < len(title) <= 16 or any(not " " <= c <= "~" or c == "\\" for c in title):
        raise ConfigError(f"{where} must be 1 to 16 printable ASCII characters without backslash, got {value!r}")
    return title


def _string_list(table: Mapping[str, Any], key: str, where: str) -> list[str]:
    values = _get(table, key, list, [], where)
    if not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}.{key} must be a list of strings, got {values!r}")
    return list(values)


def _peer_network(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ConfigError(f"scp.allowed_peers: {value!r} is not an IP address or network ({exc})") from None


def _scp_settings(scp: Mapping[str, Any]) -> ScpSettings | None:
    if not _get(scp, "enabled", bool, False, "scp"):
        return None
    port = _get(scp, "port", int, None, "scp")
    if port is None or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"scp.port must be a TCP port (1-65535) when scp.enabled = true, got {port!r}")
    host = _get(scp, "host", str, "127.0.0.1", "scp")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"scp.host must be an IP address (127.0.0.1, 0.0.0.0, ::), got {host!r}") from None
    return ScpSettings(
        port=port,
        ae_title=_ae_title(_get(scp, "aet", str, "RADFED", "scp"), "scp.aet"),
        host=host,
        allowed_aets=frozenset(_ae_title(v, "scp.allowed_aets") for v in _string_list(scp, "allowed_aets", "scp")),
        allowed_peers=tuple(_peer_network(v) for v in _string_list(scp, "allowed_peers", "scp")),
    )


def _database_url(value: str | None) -> str | None:
    if value is None or value.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://")):
        return value or None
    scheme = value.split("://", 1)[0] if "://" in value else "no scheme"
    raise ConfigError(f"node.database_url must be sqlite:///PATH or postgresql+psycopg://..., got {scheme}")


def _role(value: str) -> NodeRole:
    try:
        return NodeRole(value)
    except ValueError:
        raise ConfigError(f"node.role must be one of {', '.join(r.value for r in NodeRole)}, got {value!r}") from None


def _lease_s(value: float) -> float:
    if value < 1.0:
        raise ConfigError(f"node.lease_s must be at least 1 s (a heartbeat renews it every third), got {value}")
    return value


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read ``path`` (TOML) and apply ``RADFED_*`` environment overrides."""
    env = dict(os.environ if environ is None else environ)
    try:
        data = read_node_file(path) if path is not None else {}
        # the keys the federated site beside the node reads too (its --node-config may name this file)
        where = NodeLocations.from_file_data(data, env)
    except NodeFileError as exc:
        raise ConfigError(str(exc)) from None
    node = data.get("node", {})
    api = data.get("api", {})
    output = data.get("output", {})
    scp = data.get("scp", {})
    base = OrthancEndpoint.from_url(where.orthanc_url)
    endpoint = OrthancEndpoint(
        base.url, where.orthanc_username or base.username, where.orthanc_password or base.password
    )
    state_dir = where.state_dir
    token = env.get("RADFED_API_TOKEN") or _get(api, "token", str, "", "api")
    if not token:
        raise ConfigError("api.token (or RADFED_API_TOKEN) is required: every API route needs a token")
    try:
        destination = Destination(_get(output, "destination", str, "orthanc-rest", "output"))
    except ValueError:
        raise ConfigError(f"output.destination must be one of {', '.join(d.value for d in Destination)}") from None
    cstore = None
    if destination is Destination.CSTORE:
        target = output.get("cstore")
        if not isinstance(target, dict):
            raise ConfigError("output.destination = cstore needs an [output.cstore] table (host, port, called_aet)")
        cstore = CStoreTarget(
            _get(target, "host", str, "127.0.0.1", "output.cstore"),
            _get(target, "port", int, 104, "output.cstore"),
            _get(target, "called_aet", str, "ORTHANC", "output.cstore"),
            _get(target, "calling_aet", str, "RADFED", "output.cstore"),
        )
    dicomweb_url = _get(output, "dicomweb_url", str, None, "output")
    if destination is Destination.DICOMWEB and not dicomweb_url:
        dicomweb_url = endpoint.url + "/dicom-web"
    concurrency = _get(node, "concurrency", int, 2, "node")
    if concurrency < 1:
        raise ConfigError("node.concurrency must be at least 1")
    return NodeConfig(
        orthanc=endpoint,
        state_dir=state_dir,
        models_dir=where.models_dir,
        concurrency=concurrency,
        poll_interval_s=_get(node, "poll_interval_s", float, 1.0, "node"),
        retry_base_s=_get(node, "retry_base_s", float, 2.0, "node"),
        retry_max_s=_get(node, "retry_max_s", float, 60.0, "node"),
        max_attempts=_get(node, "max_attempts", int, 50, "node"),
        api_host=_get(api, "host", str, "127.0.0.1", "api"),
        api_port=int(env.get("RADFED_API_PORT") or _get(api, "port", int, 8700, "api")),
        api_token=token,
        destination=destination,
        dicomweb_url=dicomweb_url,
        cstore=cstore,
        seg_encoding=_seg_encoding(_get(output, "seg_encoding", str, "BINARY", "output")),
        key_images=_get(output, "key_images", bool, False, "output"),
        scp=_scp_settings(scp),
        runtime=_runtime_settings(
            data.get("inference", {}),
            _get(node, "onnx_threads", int, None, "node"),
            state_dir,
            env.get("RADFED_DEVICE"),
        ),
        prefetch=_get(node, "prefetch", bool, True, "node"),
        prefetch_quiet_s=_get(node, "prefetch_quiet_s", float, 0.5, "node"),
        prefetch_studies=_get(node, "prefetch_studies", int, 4, "node"),
        ledger_backup_interval_s=_get(node, "ledger_backup_interval_s", float, 3600.0, "node"),
        ledger_backups=_get(node, "ledger_backups", int, 24, "node"),
        reconcile_quiet_s=_get(node, "reconcile_quiet_s", float, 180.0, "node"),
        reconcile_interval_s=_get(node, "reconcile_interval_s", float, 30.0, "node"),
        device_policy=where.device_policy,
        refuse_flagged_models=_get(node, "refuse_flagged_models", bool, False, "node"),
        database_url=_database_url(env.get("RADFED_DATABASE_URL") or _get(node, "database_url", str, None, "node")),
        role=_role(_get(node, "role", str, NodeRole.ALL.value, "node")),
        lease_s=_lease_s(_get(node, "lease_s", float, DEFAULT_LEASE_S, "node")),
    )
