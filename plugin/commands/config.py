"""``radfed config``: the node file's schema (``schema``), and a file checked as ``radfed serve`` would read it,
with the environment's overrides applied and secrets masked (``check``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def cmd_config(args: argparse.Namespace) -> int:
    from radfed.plugin.node.config import load_config
    from radfed.plugin.node.settings import settings_schema, validate_settings, with_environment

    if args.action == "schema":
        print(json.dumps(settings_schema(), indent=2))
        return 0
    import os

    from radfed.inference.node_file import read_node_file

    load_config(args.file)  # every check radfed serve makes (ConfigError: exit 1, the key named)
    settings = validate_settings(with_environment(read_node_file(args.file), os.environ))
    print(json.dumps(settings.model_dump(mode="json"), indent=2))  # SecretStr dumps as "**********"
    return 0


def add_parser(commands: Any) -> None:
    config = commands.add_parser("config", help="the node configuration file: its schema, or a file checked")
    actions = config.add_subparsers(dest="action", required=True)
    actions.add_parser("schema", help="print the node file's JSON Schema (every key, type, default)")
    check = actions.add_parser("check", help="check FILE as radfed serve reads it and print the settings")
    check.add_argument("file", type=Path, metavar="FILE")
    config.set_defaults(handler=cmd_config)
