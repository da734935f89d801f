"""Download throughput over loopback, clean and with injected faults, in the same run.

    .venv/bin/python scripts/bench_download.py [--mb 256] [--json]

Serves one random file from a loopback HTTP server (tests/faulty_http.py) and downloads it
with shards.fetch three ways: a clean server; one that cuts the body short five times
(the client resumes with Range); one that also answers 503 to half the requests. Each result
is checked against the file's MD5, as a real download is.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from bench_cli import finish, parse_args, parser, use_repo

use_repo()
from faulty_http import FaultyServer  # noqa: E402 (tests/ is on sys.path from here on)

from shards.fetch import RetryPolicy, fetch  # noqa: E402

CASES = {
    "clean": {},
    "5 connections cut": {"drop_rate": 1.0, "max_drops": 5},
    "5 cut + 503 on half": {"drop_rate": 1.0, "max_drops": 5, "error_rate": 0.5, "seed": 2},
}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--mb", type=int, default=256, help="size of the served file in MiB (default 256)")
    args = parse_args(ap)
    with tempfile.TemporaryDirectory() as tmp:
        served = Path(tmp, "served")
        served.mkdir()
        data = os.urandom(args.mb << 20)
        (served / "archive.tar").write_bytes(data)
        md5 = hashlib.md5(data).hexdigest()
        del data
        results = []
        for name, faults in CASES.items():
            cache = Path(tmp, f"cache-{len(results)}")
            policy = RetryPolicy(attempts=1000, base_delay=0.01, max_delay=0.2, timeout=30)
            with FaultyServer(served, **faults) as srv:
                start = time.perf_counter()
                fetch(f"{srv.url}/archive.tar", str(cache), md5=md5, policy=policy)
                secs = time.perf_counter() - start
            faults_seen = sum(1 for _, _, s in srv.requests if s == 503)
            resumes = sum(1 for _, r, _ in srv.requests if r)
            results.append({
                "case": name, "mib": args.mb, "seconds": round(secs, 2), "mib_per_sec": round(args.mb / secs, 1),
                "requests": len(srv.requests), "resumed_with_range": resumes, "http_503": faults_seen,
            })  # fmt: skip
            print(f"{name:22s} {args.mb} MiB in {secs:6.2f} s = {args.mb / secs:7.1f} MiB/s "
                  f"({len(srv.requests)} requests, {resumes} resumed with Range, {faults_seen} answered 503)")  # fmt: skip
    finish(args, results)


if __name__ == "__main__":
    main()
