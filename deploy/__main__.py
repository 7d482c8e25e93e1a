"""``python -m radfed.deploy [NAME]``: where this installation's deployment files are.

Without NAME, one line per asset (``name<TAB>path``); with NAME, only its path, for scripts such as
``cp "$(python -m radfed.deploy node-config)" /etc/radfed/radfed-node.toml``.
"""

from __future__ import annotations

import argparse
import sys

from radfed.deploy import ASSETS, asset


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m radfed.deploy", description="Where the shipped deployment files are."
    )
    parser.add_argument("name", nargs="?", choices=sorted(ASSETS), help="print only this asset's path")
    options = parser.parse_args(args)
    names = [options.name] if options.name else list(ASSETS)
    try:
        for name in names:
            path = asset(*ASSETS[name])
            print(path if options.name else f"{name}\t{path}")
    except FileNotFoundError as error:
        print(f"radfed.deploy: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
