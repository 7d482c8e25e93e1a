"""``python -m bench [NAME ...]`` runs the named benchmarks (all by default)."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "fetch": "bench.fetch_study",
    "examine": "bench.examine",
    "encode": "bench.encode_results",
    "node": "bench.node_e2e",
    "federation": "bench.federation",
    "coordinator": "bench.coordinator",
    "viewer": "bench.viewer",
    "quality": "bench.quality",
    "chaos": "bench.chaos",
    "runtime": "bench.runtime",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    for name in args.names or list(BENCHMARKS):
        module = importlib.import_module(BENCHMARKS[name])
        module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
