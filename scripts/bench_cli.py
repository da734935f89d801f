"""What the benchmark scripts share: their command line's --json, its JSON line, the repo's imports,
the photos they build from.

    from bench_cli import REPO, default_photos, finish, parse_args, parser, use_repo  # scripts/ is on sys.path

Every benchmark prints a human-readable table and, with --json, ends with one line
{"results": [...]} that docs/benchmarks.md's figures are copied from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The photos benchmarks build their sets from: the project's 100 full-size imagenet-sample photos
# where its shared folder sits beside (or inside) the checkout, as in the runs docs/benchmarks.md
# records; else the 24 photos bundled with the tests, which every clone has.
SHARED_PHOTOS = [REPO.parent / "shared" / "data" / "imagenet-sample", REPO / "shared" / "data" / "imagenet-sample"]
BUNDLED_PHOTOS = REPO / "tests" / "data" / "photos"


def has_jpegs(folder: Path) -> bool:
    return folder.is_dir() and any(f.suffix.lower() in (".jpeg", ".jpg") for f in folder.iterdir())


def default_photos() -> Path:
    """The shared imagenet-sample photos when present, else the bundled ones (n<wnid>_*.JPEG both)."""
    return next((p for p in SHARED_PHOTOS if has_jpegs(p)), BUNDLED_PHOTOS)


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
