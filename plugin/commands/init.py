"""``radfed init --orthanc URL``: a PACS admin's first step. Writes the node's configuration file from the
shipped template (the Orthanc URL and user, the state folder filled in, every comment kept), a new API token in
an environment file only its owner can read (secrets never go in the TOML file), checks both as ``radfed serve``
will read them, and prints the keys to add to Orthanc's configuration so that its plugin reaches the node."""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from radfed.inference.errors import RadfedError

API_TOKEN_ENV = "RADFED_API_TOKEN"
ORTHANC_PASSWORD_ENV = "RADFED_ORTHANC_PASSWORD"


class InitError(RadfedError, ValueError):
    """radfed init cannot write what was asked (the message says why)."""


def node_file_text(template: str, orthanc_url: str, state_dir: Path) -> str:
    """The template with ``[orthanc] url`` / ``username`` and ``[node] state_dir`` set; the user of
    ``http://USER@HOST:PORT`` becomes ``username``."""
    parts = urlsplit(orthanc_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InitError(f"--orthanc must be an http(s) URL such as http://radfed@127.0.0.1:8042, got {orthanc_url!r}")
    if parts.password:
        raise InitError(f"--orthanc must not carry a password: put it in {ORTHANC_PASSWORD_ENV} (the env file)")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    text = _set(template, "url", json.dumps(url))
    if parts.username:
        text = _set(text, "username", json.dumps(parts.username))
    return _set(text, "state_dir", json.dumps(str(state_dir)))


def _set(text: str, key: str, value: str) -> str:
    """Replace the value of the first ``key = ...`` line, keeping its comment."""
    pattern = re.compile(rf"^(?P<key>{key}\s*=\s*)(?P<value>\"[^\"]*\"|\S+)(?P<rest>.*)$", re.MULTILINE)
    if not pattern.search(text):
        raise InitError(f"the node template has no {key} line")
    return pattern.sub(lambda m: f"{m['key']}{value}{m['rest']}", text, count=1)


def orthanc_keys(plugin_script: Path, node_url: str, env_file: Path, username: str | None) -> dict[str, Any]:
    """What to add to Orthanc's configuration (deploy/orthanc/orthanc-radfed.json with this install's paths)."""
    token = f"the {API_TOKEN_ENV} value in {env_file} (or that variable in Orthanc's environment)"
    password = f"a password for the node: the {ORTHANC_PASSWORD_ENV} value in {env_file}"
    return {
        "Plugins": [f"/usr/share/orthanc/plugins/{name}" for name in ("libOrthancPython.so", "libOrthancDicomWeb.so")],
        "PythonScript": str(plugin_script),
        "Radfed": {"Url": node_url, "Token": token},
        "RegisteredUsers": {username or "radfed": password},
        "StableAge": 60,
    }


def cmd_init(args: argparse.Namespace) -> int:
    from radfed.deploy import asset
    from radfed.plugin.node.config import load_config

    config: Path = args.config
    env_file: Path = args.env_file or config.with_name("radfed.env")
    for path in (config, env_file):
        if path.exists() and not args.force:
            raise InitError(f"{path} exists: keep it, or pass --force to replace it")
    text = node_file_text(asset("node", "radfed-node.toml").read_text(), args.orthanc, args.state_dir.resolve())
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    token = secrets.token_urlsafe(32)
    descriptor = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(f"{API_TOKEN_ENV}={token}\n{ORTHANC_PASSWORD_ENV}=\n")
    os.chmod(env_file, 0o600)  # also when it existed with wider permissions
    node = load_config(config, {API_TOKEN_ENV: token})  # what radfed serve will read: refused here, not there
    keys = orthanc_keys(
        asset("orthanc", "radfed_orthanc_plugin.py"),
        f"http://{node.api_host}:{node.api_port}",
        env_file.resolve(),
        node.orthanc.username,
    )
    print(f"wrote {config} (node configuration) and {env_file} (API token; mode 600)")
    print(f"1. put the Orthanc user's password in {env_file} ({ORTHANC_PASSWORD_ENV}=...)")
    print("2. add these keys to Orthanc's configuration and restart Orthanc:")
    print(json.dumps(keys, indent=2))
    print(f"3. start the node: set -a; . {env_file}; set +a; radfed serve --config {config}")
    return 0


def add_parser(commands: Any) -> None:
    init = commands.add_parser("init", help="write a node configuration for an Orthanc and print Orthanc's keys")
    init.add_argument("--orthanc", required=True, metavar="URL", help="http://USER@HOST:PORT (no password)")
    init.add_argument("--config", type=Path, default=Path("radfed-node.toml"), help="file to write")
    init.add_argument("--env-file", type=Path, help="secrets file to write (default: radfed.env beside --config)")
    init.add_argument("--state-dir", type=Path, default=Path("/var/lib/radfed"), help="the node's state folder")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(handler=cmd_init)
