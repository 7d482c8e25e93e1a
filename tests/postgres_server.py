"""A real PostgreSQL server for tests (Debian package ``postgresql``): initdb into a private folder, a free loopback
port, its own socket folder, password authentication, stopped by PID.

PostgreSQL refuses to run as root; as root (CI, this machine) the server runs as the ``postgres`` user that the
Debian package creates, through ``runuser``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from radfed.inference.testing.orthanc_server import free_port


def _server_bin() -> Path:
    """``RADFED_PG_BIN``, else the newest Debian server (``/usr/lib/postgresql/N/bin``: not on PATH there)."""
    if "RADFED_PG_BIN" in os.environ:
        return Path(os.environ["RADFED_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path(shutil.which("initdb") or "initdb").parent


PG_BIN = _server_bin()
USER = "radfed"


@dataclass
class PostgresServer:
    root: Path
    port: int
    pid: int
    password: str

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A psycopg connection in autocommit mode (``with server.connect(...) as connection``)."""
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname=database, autocommit=True
        )

    def create_database(self, name: str) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        with self.connect() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        log = self.root / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """Immediate shutdown (SIGQUIT to the postmaster: no checkpoint, the folder goes anyway), SIGKILL if it does
        not go, then remove the folder."""
        try:
            os.kill(self.pid, signal.SIGQUIT)
            deadline = time.monotonic() + timeout_s
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def start_postgres(timeout_s: float = 60.0) -> PostgresServer:
    """initdb and start a server; a failed step raises with PostgreSQL's own output."""
    root = Path(tempfile.mkdtemp(prefix="radfed-pg-"))
    password = secrets.token_urlsafe(12)
    (root / "password").write_text(password)
    (root / "sock").mkdir()
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (root, root / "password", root / "sock"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    (root / "password").chmod(0o600)
    port = free_port()

    def run(argv: list[str]) -> None:
        done = subprocess.run(
            _as_server_user(argv), cwd=root, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if done.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")

    data = root / "data"
    run([str(PG_BIN / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={root / 'password'}"]
        + ["--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"])  # fmt: skip
    # fsync off: a test server, never crashed on purpose by the tests.
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root / 'sock'} -c fsync=off"
    run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w"]
        + ["-t", str(int(timeout_s)), "start"])  # fmt: skip
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return PostgresServer(root, port, pid, password)
