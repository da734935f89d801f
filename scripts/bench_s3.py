"""Training reads from S3 through the shard cache, against the same backend on local disk, in one run.

    .venv/bin/python scripts/bench_s3.py [--copies 36] [--shard-mb 50] [--epochs 3] [--limit-share 0.6] [--json]

A real S3 endpoint (moto's server, its own process) behind a loopback proxy that adds 25 ms to
every request (tests/faulty_s3_proxy.py; a bucket in the same region). The shards are built by
the project's writer from the real photos in --photos, each repeated --copies times, in shards
of at least --shard-mb. Each backend reads --epochs epochs (train transform) twice, each in a
fresh spawned process: from the local folder, then from s3:// through a cache whose limit is
--limit-share of the set, so every epoch must download again what it evicted. Reported per
backend: images/s over all epochs, from make_loader to the last batch (the remote run
therefore includes waiting for the first shards), and its ratio to local disk; bytes
downloaded over the bytes the epochs read (every shard a rank's plan touches, whole, plus the
indexes); the cache folder's peak size, sampled every 50 ms, against the limit; the CPU seconds
the S3 side (moto and the proxy) spent meanwhile, on the same cores as the loader (the loader
processes run at nice 5, so that side is not starved as a remote store would not be). Last, two ranks
on one machine read one epoch into one fresh shared cache, and the proxy counts the GETs of
each shard.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faulty_s3_proxy import FaultyS3Proxy

BUCKET, PREFIX = "bench", "set"
LOADER_NICE = 5


def folder_bytes(folder: str) -> int:
    total = 0
    with os.scandir(folder) as it:
        for e in it:
            try:
                if e.is_file(follow_symlinks=False):
                    total += max(e.stat().st_size, e.stat().st_blocks * 512)
            except FileNotFoundError:
                pass
    return total


def read_epochs(cfg: dict, queue) -> None:
    """One measurement in a spawned process: make_loader, then cfg["epochs"] epochs.

    At nice LOADER_NICE, local and s3 runs alike: the S3 side (moto and the proxy), which in
    production is another machine, then gets the CPU it needs instead of waiting behind the
    decoder threads on the same cores.
    """
    os.nice(LOADER_NICE)
    try:
        from loaders import make_loader

        peak, stop = [0], threading.Event()
        if cfg.get("cache_dir"):
            os.makedirs(cfg["cache_dir"], exist_ok=True)

            def watch() -> None:
                while not stop.wait(0.05):
                    peak[0] = max(peak[0], folder_bytes(cfg["cache_dir"]))

            threading.Thread(target=watch, daemon=True).start()
        start = time.perf_counter()
        ld = make_loader(
            cfg["spec"],
            batch_size=cfg["batch_size"],
            train=True,
            backend=cfg["backend"],
            workers=cfg["workers"],
            image_size=cfg["image_size"],
            rank=cfg.get("rank", 0),
            world_size=cfg.get("world_size", 1),
            cache_dir=cfg.get("cache_dir"),
            cache_limit=cfg.get("cache_limit"),
        )
        images, per_epoch, needed = 0, [], 0
        sizes = [s.bytes for s in ld.shards]
        for epoch in range(cfg["epochs"]):
            ld.set_epoch(epoch)
            needed += sum(sizes[s] for s in set(ld.plan().shard.tolist()))
            t0, n = time.perf_counter(), 0
            for x, _ in ld:
                n += x.shape[0]
            per_epoch.append(round(n / (time.perf_counter() - t0), 1))
            images += n
        wall = time.perf_counter() - start
        stop.set()
        out = {"images": images, "seconds": round(wall, 2), "images_per_sec": round(images / wall, 1)}
        out["epoch_images_per_sec"] = per_epoch
        if ld.cache is not None:
            st = ld.cache.stats
            index_bytes = sum(os.path.getsize(s.index_url) for s in ld.shards)
            peak[0] = max(peak[0], folder_bytes(cfg["cache_dir"]))
            out.update(
                bytes_downloaded=st.bytes_downloaded,
                bytes_needed=needed + index_bytes,
                hits=st.hits,
                misses=st.misses,
                evicted=st.evicted,
                peak_cache_bytes=peak[0],
                cache_limit=ld.cache.limit,
                largest_shard=max(sizes),
                in_flight=ld.cache.in_flight,
            )
        ld.close()
        queue.put(out)
    except BaseException as e:
        queue.put({"error": f"{type(e).__name__}: {e}"})
        raise


def spawn(cfgs: list[dict]) -> list[dict]:
    """Run read_epochs for each cfg in its own spawned process, all at once; their results."""
    ctx = mp.get_context("spawn")
    runs = []
    for cfg in cfgs:
        q = ctx.Queue()
        p = ctx.Process(target=read_epochs, args=(cfg, q))
        p.start()
        runs.append((p, q))
    out = [q.get(timeout=3600) for _, q in runs]
    for p, _ in runs:
        p.join(60)
    return out


def server_cpu(moto: subprocess.Popen) -> float:
    """CPU seconds of the moto server and of this process (the proxy's threads) so far."""
    import psutil

    total = 0.0
    for p in (psutil.Process(moto.pid), psutil.Process()):
        t = p.cpu_times()
        total += t.user + t.system
    return total


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def upload(endpoint: str, folder: Path) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(200):
        try:
            s3.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            time.sleep(0.1)
    for p in sorted(folder.iterdir()):
        s3.upload_file(str(p), BUCKET, f"{PREFIX}/{p.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="/work/shared/data/imagenet-sample", help="folder of n<wnid>_*.JPEG photos")
    ap.add_argument("--copies", type=int, default=36, help="times each photo is repeated (default 36)")
    ap.add_argument("--shard-mb", type=float, default=50, help="at least this many MB a shard (default 50)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs each run reads (default 3)")
    ap.add_argument("--limit-share", type=float, default=0.6, help="cache limit as a share of the set (default 0.6)")
    ap.add_argument("--backends", default="dali,pytorch", help="comma-separated (default dali,pytorch)")
    ap.add_argument("--batch-size", type=int, default=64, help="default 64")
    ap.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader workers (default 2)")
    ap.add_argument("--image-size", type=int, default=224, help="default 224")
    ap.add_argument("--latency", type=float, default=0.025, help="seconds the proxy adds per request (default 0.025)")
    ap.add_argument("--json", action="store_true", help="end with one line of JSON holding the results")
    args = ap.parse_args()

    from loaders.bench_data import build_bench_shards

    photos = sorted(Path(args.photos).glob("*.JPEG"))
    total_bytes = args.copies * sum(p.stat().st_size for p in photos)
    count = max(1, int(total_bytes // (args.shard_mb * 1e6)))  # equal shards of at least --shard-mb
    per_shard = math.ceil(args.copies * len(photos) / count)
    results: dict = {"load_at_start": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, "local")
        build_bench_shards(str(args.photos), str(local), args.copies, per_shard)
        m = json.loads((local / "manifest.json").read_text())
        shards = m["splits"]["train"]["shards"]
        set_bytes = sum(s["bytes"] for s in shards)
        limit = int(args.limit_share * set_bytes)
        results["set"] = {
            "samples": m["splits"]["train"]["samples"],
            "shards": len(shards),
            "mb": round(set_bytes / 1e6, 1),
            "shard_mb": [round(s["bytes"] / 1e6, 1) for s in shards],
            "cache_limit_mb": round(limit / 1e6, 1),
        }
        print(f"set: {results['set']}", flush=True)
        moto, endpoint = start_moto()
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        try:
            upload(endpoint, local)
            with FaultyS3Proxy(endpoint, latency=args.latency) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                common = dict(
                    epochs=args.epochs, batch_size=args.batch_size, workers=args.workers, image_size=args.image_size
                )
                for backend in args.backends.split(","):
                    base = spawn([dict(common, spec=str(local), backend=backend)])[0]
                    cache = Path(tmp, f"cache-{backend}")
                    remote_cfg = dict(common, spec=f"s3://{BUCKET}/{PREFIX}", backend=backend, cache_dir=str(cache))
                    cpu0 = server_cpu(moto)
                    remote = spawn([dict(remote_cfg, cache_limit=limit)])[0]
                    # the S3 side (moto + the latency proxy) runs on the same cores as the loader here
                    remote["s3_server_cpu_s"] = round(server_cpu(moto) - cpu0, 1)
                    if "error" not in base and "error" not in remote:
                        remote["vs_local"] = round(remote["images_per_sec"] / base["images_per_sec"], 3)
                        remote["bytes_ratio"] = round(remote["bytes_downloaded"] / remote["bytes_needed"], 3)
                    results[backend] = {"local": base, "s3": remote}
                    print(f"{backend}: {json.dumps(results[backend])}", flush=True)
                # two ranks, one machine, one fresh cache: every shard should cross the wire once
                proxy.log.clear()
                cache = Path(tmp, "cache-2ranks")
                two = spawn(
                    [
                        dict(common, epochs=1, spec=f"s3://{BUCKET}/{PREFIX}", backend="pytorch", cache_dir=str(cache),
                             cache_limit=limit, rank=r, world_size=2)
                        for r in (0, 1)
                    ]
                )  # fmt: skip
                gets = Counter()
                for method, path, n in proxy.log:
                    if method == "GET" and path.endswith(".tar"):
                        gets[path.rsplit("/", 1)[-1]] += n
                sizes = {s["name"]: s["bytes"] for s in shards}
                results["two_ranks"] = {
                    "ranks": two,
                    "shards_read": len(gets),
                    "shards_downloaded_more_than_once": sorted(k for k, n in gets.items() if n > sizes[k]),
                    "tar_bytes_over_the_wire_per_shard_read": round(
                        sum(gets.values()) / sum(sizes[k] for k in gets), 3
                    ),
                }
                print(f"two ranks: {json.dumps(results['two_ranks'])}", flush=True)
        finally:
            moto.terminate()
            moto.wait(30)
    results["load_at_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
