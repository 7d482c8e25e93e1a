"""Node configuration: a TOML file, with environment variables for secrets and overrides.

Read once, at the edge (``radfed serve``), and passed down as a frozen object. Secrets are never part
of ``repr`` and never logged.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from radfed.inference.errors import RadfedError
from radfed.inference.model.arbiter import DevicePolicy
from radfed.inference.model.device import RuntimeSettings
from radfed.inference.node_file import NodeFileError, NodeLocations, read_node_file
from radfed.inference.orthanc.client import OrthancEndpoint
from radfed.plugin.node.ledger.store import DEFAULT_LEASE_S
from radfed.plugin.node.settings import (
    Destination,
    InferenceSection,
    NodeRole,
    ScpSection,
    SettingsError,
    validate_settings,
    with_environment,
)


class ConfigError(RadfedError, ValueError):
    """The node configuration is invalid; the message names the setting."""


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
    prefetch: bool = True  # prepare arriving studies before StableStudy (plugin/node/prefetch.py)
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
        """What :class:`~radfed.plugin.node.ledger.store.Ledger` opens: the URL when set, else the SQLite file."""
        return self.database_url or self.ledger_path

    @property
    def backup_dir(self) -> Path:
        return self.state_dir / "backups"


def _runtime_settings(section: InferenceSection, threads: int | None, state_dir: Path) -> RuntimeSettings:
    """``[inference]``: the wanted device (``RADFED_DEVICE`` overrides it), GPU options, windows per run."""
    return RuntimeSettings(
        device=section.device,
        device_id=section.device_id,
        gpu_mem_limit_mb=section.gpu_mem_limit_mb,
        tensorrt=section.tensorrt,
        engine_cache_dir=state_dir / "tensorrt-engines",
        batch_windows=section.batch_windows,
        warmup=section.warmup,
        fp16=section.fp16,
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


def _peer_network(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ConfigError(f"scp.allowed_peers: {value!r} is not an IP address or network ({exc})") from None


def _scp_settings(scp: ScpSection) -> ScpSettings | None:
    if not scp.enabled:
        return None
    port = scp.port
    if port is None or not 0 < port < 65536:
        raise ConfigError(f"scp.port must be a TCP port (1-65535) when scp.enabled = true, got {port!r}")
    try:
        ipaddress.ip_address(scp.host)
    except ValueError:
        raise ConfigError(f"scp.host must be an IP address (127.0.0.1, 0.0.0.0, ::), got {scp.host!r}") from None
    return ScpSettings(
        port=port,
        ae_title=_ae_title(scp.aet, "scp.aet"),
        host=scp.host,
        allowed_aets=frozenset(_ae_title(v, "scp.allowed_aets") for v in scp.allowed_aets),
        allowed_peers=tuple(_peer_network(v) for v in scp.allowed_peers),
    )


def _database_url(value: str | None) -> str | None:
    if value is None or value.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://")):
        return value or None
    scheme = value.split("://", 1)[0] if "://" in value else "no scheme"
    raise ConfigError(f"node.database_url must be sqlite:///PATH or postgresql+psycopg://..., got {scheme}")


def _lease_s(value: float) -> float:
    if value < 1.0:
        raise ConfigError(f"node.lease_s must be at least 1 s (a heartbeat renews it every third), got {value}")
    return value


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read ``path`` (TOML), apply ``RADFED_*`` environment overrides and validate against the schema
    (plugin/node/settings.py)."""
    env = dict(os.environ if environ is None else environ)
    try:
        data = with_environment(read_node_file(path) if path is not None else {}, env)
        settings = validate_settings(data)
        # the keys the federated site beside the node reads too (its --node-config may name this file)
        where = NodeLocations.from_file_data(data, {})
    except (NodeFileError, SettingsError) as exc:
        raise ConfigError(str(exc)) from None
    node, api, output = settings.node, settings.api, settings.output
    base = OrthancEndpoint.from_url(where.orthanc_url)
    endpoint = OrthancEndpoint(
        base.url, where.orthanc_username or base.username, where.orthanc_password or base.password
    )
    state_dir = where.state_dir
    token = api.token.get_secret_value() if api.token else ""
    if not token:
        raise ConfigError("api.token (or RADFED_API_TOKEN) is required: every API route needs a token")
    destination = output.destination
    cstore = None
    if destination is Destination.CSTORE:
        if output.cstore is None:
            raise ConfigError("output.destination = cstore needs an [output.cstore] table (host, port, called_aet)")
        target = output.cstore
        cstore = CStoreTarget(target.host, target.port, target.called_aet, target.calling_aet)
    dicomweb_url = output.dicomweb_url
    if destination is Destination.DICOMWEB and not dicomweb_url:
        dicomweb_url = endpoint.url + "/dicom-web"
    database_url = node.database_url.get_secret_value() if node.database_url else None
    return NodeConfig(
        orthanc=endpoint,
        state_dir=state_dir,
        models_dir=where.models_dir,
        concurrency=node.concurrency,
        poll_interval_s=node.poll_interval_s,
        retry_base_s=node.retry_base_s,
        retry_max_s=node.retry_max_s,
        max_attempts=node.max_attempts,
        api_host=api.host,
        api_port=api.port,
        api_token=token,
        destination=destination,
        dicomweb_url=dicomweb_url,
        cstore=cstore,
        seg_encoding=_seg_encoding(output.seg_encoding),
        key_images=output.key_images,
        scp=_scp_settings(settings.scp),
        runtime=_runtime_settings(settings.inference, node.onnx_threads, state_dir),
        prefetch=node.prefetch,
        prefetch_quiet_s=node.prefetch_quiet_s,
        prefetch_studies=node.prefetch_studies,
        ledger_backup_interval_s=node.ledger_backup_interval_s,
        ledger_backups=node.ledger_backups,
        reconcile_quiet_s=node.reconcile_quiet_s,
        reconcile_interval_s=node.reconcile_interval_s,
        device_policy=where.device_policy,
        refuse_flagged_models=node.refuse_flagged_models,
        database_url=_database_url(database_url),
        role=node.role,
        lease_s=_lease_s(node.lease_s),
    )
