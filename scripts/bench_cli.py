"""What the benchmark scripts share: their command line's --json, its JSON line, the repo's imports.

    from bench_cli import REPO, finish, json_flag, use_repo   # the script's own folder is on sys.path

Every benchmark prints a human-readable table and, with --json, ends with one line
{"results": [...]} that docs/benchmarks.md's figures are copied from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def use_repo() -> None:
    """Import this checkout's packages and the test helpers (fixtures, fault-injecting servers)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose --help is the script's docstring, as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The script's options, with --json last."""
    ap.add_argument("--json", action="store_true", help="end with one line of JSON holding the results")
    return ap.parse_args()


def finish(args: argparse.Namespace, results: list[dict]) -> None:
    if args.json:
        print(json.dumps({"results": results}))
