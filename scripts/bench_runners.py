"""Time the build-shards flow with the default runner and with Dask, in one run, on one fixture.

    .venv/bin/python scripts/bench_runners.py [--classes 20 --per-class 50 --val-per-class 10 --workers 2]

The fixture is bench_build.py's: the real imagenet-sample photos (--photos; by default the shared data folder beside the repository) at full
size, replicated into the three ILSVRC2012 archives (with the test fixture's planted bad
members). The flow runs twice against one temporary Prefect server, same seed and options:
--runner local --workers N (threads feeding a process pool), then --runner dask --workers N
(a LocalCluster of N worker processes, one thread each, started and stopped inside the run).
Both outputs must be byte-identical; the script fails otherwise.

Per runner it prints the flow's wall time (what a user waits: for dask it includes starting
and stopping the cluster), the write phase (first shard started to last shard published,
summed over splits, from the flow's summary rows) and images/s over that phase.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_cli import default_photos, finish, parse_args, parser, use_repo

use_repo()


def digests(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.suffix in (".tar", ".idx")
    }


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--classes", type=int, default=20, help="classes in the fixture (default 20)")
    ap.add_argument("--per-class", type=int, default=50, help="train images per class (default 50)")
    ap.add_argument("--val-per-class", type=int, default=10, help="val images per class (default 10)")
    ap.add_argument("--workers", type=int, default=2, help="processes for both runners (default 2)")
    ap.add_argument("--shard-size", default="8MB", help="target shard size (default 8MB)")
    ap.add_argument("--photos", type=Path, default=default_photos(), help="folder of n<wnid>_*.JPEG photos")
    args = parse_args(ap)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from ilsvrc_fixture import make_ilsvrc
    from prefect.testing.utilities import prefect_test_harness

    from flows.build_shards import build_shards

    results = []
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        root = Path(tmp, "ilsvrc")
        make_ilsvrc(root, args.classes, args.per_class, args.val_per_class, photo_dir=args.photos, max_side=None)
        common = {"dataset": "imagenet", "source": str(root), "seed": 0, "workers": args.workers}
        outs = {}
        for runner in ("local", "dask"):
            outs[runner] = Path(tmp, f"out-{runner}")
            load = os.getloadavg()[0]
            start = time.perf_counter()
            result = build_shards(output=str(outs[runner]), shard_size=args.shard_size, runner=runner, **common)
            wall = time.perf_counter() - start
            rows = result["rows"]
            images, write_s = sum(r["samples"] for r in rows), sum(r["seconds"] for r in rows)
            results.append({
                "runner": runner, "workers": args.workers, "images": images,
                "shards": sum(r["shards"] for r in rows), "flow_wall_s": round(wall, 2),
                "write_s": round(write_s, 2), "images_per_sec_write": round(images / write_s, 1),
                "load_avg_1min_at_start": round(load, 2),
            })  # fmt: skip
        if digests(outs["local"]) != digests(outs["dask"]):
            sys.exit("error: the dask runner's shards differ from the local runner's")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}; outputs byte-identical")
    print("| runner | images | shards | flow wall s | write phase s | images/s (write phase) | load at start |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['runner']} ({r['workers']} workers) | {r['images']} | {r['shards']} | {r['flow_wall_s']} | "
              f"{r['write_s']} | {r['images_per_sec_write']} | {r['load_avg_1min_at_start']} |")  # fmt: skip
    finish(args, results)


if __name__ == "__main__":
    main()
