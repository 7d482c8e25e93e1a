"""A whole federation on one machine, for tests, benchmarks and the demo: one Orthanc per hospital holding
its own synthetic non-IID studies, a SuperLink (TLS + SuperNode authentication by default) and one
SuperNode per hospital, all on 127.0.0.1. Everything started here is stopped by :meth:`LoopbackFederation.stop`.

A real deployment runs the same pieces on separate machines (README.md, "Federated training")."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radfed.federation.job.run_config import RunConfig
from radfed.federation.site.config import ORTHANC_PASSWORD_ENV
from radfed.federation.site.supernode import FLOWER_HEARTBEAT_S, FLOWER_IDLE_PULL_S
from radfed.inference.errors import RadfedError
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import (
    OrthancOptions,
    OrthancProcess,
    free_port,
    start_orthanc,
    stop_orthancs,
)
from radfed.inference.testing.synthetic.sites import site_profile
from radfed.inference.testing.synthetic.writer import iter_site_studies, label_row, upload_study, write_labels

logger = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
CONNECTION = "radfed-local"


class FederationLaunchError(RadfedError, RuntimeError):
    """A process of the local federation did not start; the message carries its log tail."""


def flower_environment(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment with its own FLWR_HOME, the venv's executables first, no telemetry or update checks."""
    home.mkdir(parents=True, exist_ok=True)
    return dict(
        os.environ,
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        ORT_DISABLE_TELEMETRY="1",
        **(extra or {}),
    )


def wait_for_port(port: int, timeout_s: float = 60.0) -> bool:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


@dataclass
class ManagedProcess:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                self.args, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        """Stop the process and what it spawned (its session: a SuperNode's ClientApp processes too)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class FederationOptions:
    sites: int = 3
    studies_per_site: int = 6
    seed: int = 11
    small: bool = True  # reduced-size studies (tests, CI); full size for the demo's realism
    secure: bool = True  # TLS + SuperNode authentication, as a real deployment
    persistent_superlink: bool = True  # SuperLink state in SQLite: node registrations survive its restart
    warm_clientapp: bool = True  # SuperNodes in --isolation process with the warm SuperExec (site/superexec.py)
    # SuperNodes pull this often while idle (site/supernode.py; Flower's own 3 s): one machine's loopback, where the
    # coordinator's requests cost nothing and each message would otherwise wait up to 3 s to be picked up
    idle_pull_s: float = 0.25
    heartbeat_s: int = 10  # the least the SuperLink accepts (Flower's 30): a killed site is unavailable after 20 s


@dataclass
class Site:
    name: str
    orthanc: OrthancProcess
    labels: Path
    state_dir: Path
    models_dir: Path
    supernode: ManagedProcess | None = None


@dataclass
class JobOutcome:
    returncode: int
    out_dir: Path
    log: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class LoopbackFederation:
    workdir: Path
    app_dir: Path  # deploy/flower
    options: FederationOptions = field(default_factory=FederationOptions)
    sites: list[Site] = field(default_factory=list)
    superlink: ManagedProcess | None = None
    port: int = 0
    extra_supernodes: list[ManagedProcess] = field(default_factory=list)
    node_config_extra: dict[str, str] = field(default_factory=dict)  # site name -> extra node config

    @property
    def credentials(self) -> Path:
        return self.workdir / "credentials"

    @property
    def env(self) -> dict[str, str]:
        return flower_environment(self.workdir / "flwr-home")

    def start(self, progress: Callable[[str], None] = lambda _: None) -> LoopbackFederation:
        """Credentials, Orthancs with data, SuperLink, registered SuperNodes; all or nothing."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            names = [f"hospital-{i}" for i in range(1, self.options.sites + 1)]
            # side by side: each is mostly waiting (openssl, an Orthanc starting, uploads into it)
            with ThreadPoolExecutor(max_workers=len(names) + 1) as pool:
                credentials: list[Future[None]] = []
                if self.options.secure:
                    progress("credentials")
                    credentials.append(pool.submit(self._make_credentials, [*names, "intruder"]))
                starting: list[Future[Site]] = []
                for index, name in enumerate(names, start=1):
                    progress(f"{name}: Orthanc and studies")
                    starting.append(pool.submit(self._start_site, index, name))
                # every site that did start is kept (so that stop() stops it) before a failed one is raised
                self.sites += [f.result() for f in starting if f.exception() is None]
                for started in starting:
                    started.result()
                for made in credentials:
                    made.result()
            progress("coordinator")
            self._start_superlink()
            with ThreadPoolExecutor(max_workers=len(self.sites)) as pool:  # one `flwr` command each: ~1.5 s apiece
                list(pool.map(self.register, [site.name for site in self.sites]))
            for site in self.sites:
                self.start_supernode(site)
            self.wait_online(len(self.sites))
        except BaseException:
            self.stop()
            raise
        return self

    def _make_credentials(self, names: list[str]) -> None:
        if (self.credentials / "ca.crt").is_file():
            return
        made = subprocess.run(
            ["bash", str(self.app_dir / "make-credentials.sh"), str(self.credentials), "127.0.0.1", *names],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if made.returncode != 0:
            raise FederationLaunchError(f"make-credentials.sh failed: {made.stderr[-1000:]}")

    def _start_site(self, index: int, name: str) -> Site:
        root = self.workdir / name
        orthanc = start_orthanc(
            root / "orthanc", OrthancOptions(name=name, aet=name.upper().replace("-", "")[:16], stable_age_s=2)
        )
        profile = site_profile(index, small=self.options.small)
        rows = []
        with OrthancClient(orthanc.endpoint) as client:
            for study in iter_site_studies(profile, self.options.studies_per_site, self.options.seed):
                upload_study(study, client)
                rows.append(label_row(study))
        labels = root / "labels.csv"
        write_labels(rows, labels)
        return Site(name, orthanc, labels, root / "state", root / "models")

    def _flower(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True, check=False, timeout=timeout_s
        )

    def _start_superlink(self) -> None:
        self.port = self.port or free_port()
        args = [
            str(BIN / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.options.persistent_superlink:
            args += ["--database", str(self.workdir / "superlink.db")]
        if self.options.secure:
            c = self.credentials
            args += ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem")]
            args += ["--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"]
        else:
            args += ["--insecure"]
        self.superlink = ManagedProcess("superlink", args, self.env, self.workdir / "logs" / "superlink.log")
        self.superlink.start()
        if not wait_for_port(self.port):
            raise FederationLaunchError(f"the SuperLink did not start:\n{self.superlink.tail()}")
        connection = (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
        )
        connection += (
            f'root-certificates = "{self.credentials / "ca.crt"}"\n' if self.options.secure else "insecure = true\n"
        )
        (self.workdir / "flwr-home" / "config.toml").write_text(connection)

    def restart_superlink(self, sig: int = signal.SIGKILL) -> None:
        """The coordinator crashes (or is restarted by its admin) and comes back on the same port."""
        assert self.superlink is not None
        self.superlink.stop(sig)
        self._start_superlink()

    def register(self, key_name: str) -> None:
        if not self.options.secure:
            return
        registered = self._flower("supernode", "register", str(self.credentials / f"{key_name}.pub"), CONNECTION)
        if registered.returncode != 0 and "already" not in (registered.stdout + registered.stderr).lower():
            raise FederationLaunchError(f"registering {key_name}: {registered.stdout[-500:]}{registered.stderr[-500:]}")

    def supernode_process(self, name: str, node_config: str, key_name: str, env: dict[str, str]) -> ManagedProcess:
        supernode = [str(BIN / "flower-supernode")]
        if (self.options.idle_pull_s, self.options.heartbeat_s) != (FLOWER_IDLE_PULL_S, FLOWER_HEARTBEAT_S):
            supernode = [sys.executable, "-m", "radfed.federation.site.supernode",
                         "--idle-pull-s", str(self.options.idle_pull_s), "--heartbeat-s", str(self.options.heartbeat_s),
                         "--"]  # fmt: skip
        args = [
            *supernode,
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
        ]
        if self.options.secure:
            args += ["--root-certificates", str(self.credentials / "ca.crt")]
            args += ["--auth-supernode-private-key", str(self.credentials / key_name)]
        else:
            args += ["--insecure"]
        if self.options.warm_clientapp:  # the SuperNode runs as a child of radfed's warm SuperExec
            runtime_api = f"127.0.0.1:{args[args.index('--port') + 1]}"
            args = [sys.executable, "-m", "radfed.federation.site.superexec", "--runtime-api-address", runtime_api,
                    "--", *args, "--isolation", "process"]  # fmt: skip
        return ManagedProcess(f"supernode-{name}", args, env, self.workdir / "logs" / f"supernode-{name}.log")

    def start_supernode(self, site: Site) -> None:
        endpoint = site.orthanc.endpoint
        data = endpoint.url.replace("://", f"://{endpoint.username}@", 1)
        config = (
            f"data='{data}' labels='{site.labels}' state-dir='{site.state_dir}' "
            f"models-dir='{site.models_dir}' site-name='{site.name}' {self.node_config_extra.get(site.name, '')}"
        ).strip()
        # Sites share this machine's cores here (at a hospital each has its own): one torch thread pool each.
        threads = str(max(1, (os.cpu_count() or 1) // max(1, len(self.sites))))
        env = flower_environment(
            self.workdir / f"flwr-{site.name}",
            {ORTHANC_PASSWORD_ENV: endpoint.password or "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        )
        site.supernode = self.supernode_process(site.name, config, site.name, env)
        site.supernode.start()

    def start_unregistered(self) -> ManagedProcess:
        """A SuperNode holding a key the coordinator never registered (it must be refused)."""
        site = self.sites[0]
        process = self.supernode_process(
            "intruder", f"data='{site.orthanc.url}' state-dir='{self.workdir / 'intruder'}'", "intruder", self.env
        )
        process.start()
        self.extra_supernodes.append(process)
        return process

    def online_nodes(self) -> int:
        listed = self._flower("supernode", "list", CONNECTION, "--format", "json")
        if listed.returncode != 0:
            return 0
        try:
            nodes = json.loads(listed.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(str(n.get("status", "")).lower() == "online" for n in nodes)

    def wait_online(self, count: int, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.online_nodes() >= count:
                return
            time.sleep(1.0)
        tails = "\n".join(f"--- {s.name}\n{s.supernode.tail(8)}" for s in self.sites if s.supernode)
        raise FederationLaunchError(f"fewer than {count} SuperNodes online after {timeout_s:.0f} s\n{tails}")

    def submit(self, out_dir: Path, run_config: Mapping[str, Any]) -> subprocess.Popen[str]:
        """Start a job (``flwr run --stream``) without waiting; its stream is written to out_dir/run.log."""
        app = self.workdir / "app"
        if not app.exists():
            shutil.copytree(self.app_dir, app, ignore=shutil.ignore_patterns("*.sh", "README*"))
        out_dir.mkdir(parents=True, exist_ok=True)
        values = {"out-dir": str(out_dir), **run_config}
        RunConfig.from_run_config(values)  # an unknown key or a wrong type fails here, not in the ServerApp
        config = " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())
        log = (out_dir / "run.log").open("a")
        return subprocess.Popen(
            [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", config],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def run_job(self, out_dir: Path, run_config: Mapping[str, Any], timeout_s: float = 1800) -> JobOutcome:
        started = time.perf_counter()
        process = self.submit(out_dir, run_config)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            returncode = 124
        log = (out_dir / "run.log").read_text(errors="replace")
        # A job succeeded when its artifact exists, whatever the CLI's exit status says.
        if returncode == 0 and not (out_dir / "artifact" / "manifest.json").is_file():
            returncode = 1
        return JobOutcome(returncode, out_dir, log, time.perf_counter() - started)

    def stop(self) -> None:
        for process in self.extra_supernodes:
            process.stop()
        for site in self.sites:
            if site.supernode is not None:
                site.supernode.stop()
        if self.superlink is not None:
            self.superlink.stop()
        stop_orthancs([site.orthanc for site in self.sites])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"
