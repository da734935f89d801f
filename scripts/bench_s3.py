"""Training reads from S3 through the node's shard cache, against local disk and against the wire.

    .venv/bin/python scripts/bench_s3.py [--modes single,node,two-nodes] [--backends pytorch,dali]
        [--copies 8] [--shard-mb 4] [--epochs 3] [--limit-share 0.5] [--bandwidth-mb 20] [--json]

A real S3 endpoint (moto's server, its own process) behind the loopback proxy of
tests/faulty_s3_proxy.py, which adds --latency to every request and caps all responses together
at --bandwidth-mb MB/s: the wire's limit is known. The shards are built by the project's writer
from the real photos in --photos, each repeated --copies times, in shards of about --shard-mb.

Modes (each rank a fresh spawned process, at nice 5 so the S3 side is not starved on shared cores):
- single: one rank reads --epochs epochs from local disk, then from s3:// through a fresh cache
  whose limit is --limit-share of the set;
- node: 8 ranks (world_size 8, one node) read the same, first from local disk, then from s3://
  through one shared cache folder with that limit;
- two-nodes: 4 ranks as 2 nodes of 2 (LOCAL_WORLD_SIZE=2), a cache folder (and that limit) each.

Reported per mode and backend, for the cold (first) epoch and the warm ones separately: img/s from
s3 against the limit min(local disk img/s, img/s the wire allows), where the wire allows the
epoch's floor bytes at --bandwidth-mb (floor: the cold epoch must download every shard the node
reads; a warm one what a cache of that limit cannot keep, the set minus the limit); bytes
downloaded against the floor over all epochs; the cache folder's peak size (sampled every 20 ms
from outside, .part files included) against the limit and against limit + 2 of the largest shards.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_cli import default_photos
from faulty_s3_proxy import FaultyS3Proxy

BUCKET, PREFIX = "bench", "set"
LOADER_NICE = 5


def folder_bytes(folder: str) -> int:
    total = 0
    with os.scandir(folder) as it:
        for e in it:
            try:
                if e.is_file(follow_symlinks=False) and not e.name.startswith("."):
                    total += e.stat().st_size
            except FileNotFoundError:
                pass
    return total


def read_epochs(cfg: dict, queue) -> None:
    """One rank in a spawned process: make_loader, then cfg["epochs"] epochs; per-epoch times and bytes."""
    os.nice(LOADER_NICE)
    if cfg.get("local_world_size"):
        os.environ["LOCAL_WORLD_SIZE"] = str(cfg["local_world_size"])
    try:
        from loaders import make_loader

        start = time.time()
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
        epochs = []
        for epoch in range(cfg["epochs"]):
            ld.set_epoch(epoch)
            t0, n = time.time(), 0
            for x, _ in ld:
                n += x.shape[0]
            got = ld.cache.stats.bytes_downloaded if ld.cache is not None else 0
            epochs.append({"start": t0, "end": time.time(), "images": n, "downloaded": got})
        out = {"made": start, "epochs": epochs}
        if ld.cache is not None:
            out["misses"] = ld.cache.stats.misses
        ld.close()
        queue.put(out)
    except BaseException as e:
        queue.put({"error": f"{type(e).__name__}: {e}"})
        raise


def spawn(cfgs: list[dict]) -> list[dict]:
    """read_epochs for each cfg in its own spawned process, all at once; their results."""
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
    errors = [r["error"] for r in out if "error" in r]
    if errors:
        raise SystemExit(f"a rank failed: {errors[0]}")
    return out


def per_epoch_rates(ranks: list[dict]) -> list[float]:
    """Images/s of the node per epoch: all ranks' images over the span from the first start to the last end."""
    rates = []
    for e in range(len(ranks[0]["epochs"])):
        eps = [r["epochs"][e] for r in ranks]
        span = max(x["end"] for x in eps) - min(x["start"] for x in eps)
        rates.append(sum(x["images"] for x in eps) / span)
    return rates


def node_floor(counts: list[int], sizes: list[int], ranks: range, common: dict, world: int, facts: dict) -> list[int]:
    """The least bytes a node's cache of that limit must download each epoch: the cold epoch every
    shard its ranks touch (and the indexes); a later one what it touches minus what it could have
    kept from the epoch before (shards touched in both, up to the limit)."""
    from loaders.sharding import plan_epoch

    touched = []
    for e in range(common["epochs"]):
        shards: set[int] = set()
        for r in ranks:
            p = plan_epoch(counts, batch_size=common["batch_size"], rank=r, world_size=world, seed=0, epoch=e,
                           drop_last=True)  # fmt: skip
            shards |= set(p.shard.tolist())
        touched.append(shards)
    floor = [sum(sizes[s] for s in touched[0]) + facts["idx_bytes"]]
    for e in range(1, len(touched)):
        keep = min(facts["limit"] - facts["idx_bytes"], sum(sizes[s] for s in touched[e] & touched[e - 1]))
        floor.append(sum(sizes[s] for s in touched[e]) - keep)
    return floor


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


MODES = {"single": [(1, None)], "node": [(8, None)], "two-nodes": [(2, 0), (2, 1)]}  # (ranks, node) per cache


def run_mode(mode: str, backend: str, common: dict, local: Path, tmp: str, facts: dict, bw: float) -> dict:
    groups = MODES[mode]
    world = sum(n for n, _ in groups)
    lws = groups[0][0] if len(groups) > 1 else None
    ranks = [dict(common, backend=backend, rank=r, world_size=world) for r in range(world)]
    base = spawn([dict(c, spec=str(local)) for c in ranks])
    results: dict = {"local_img_s": [round(x, 1) for x in per_epoch_rates(base)]}
    cfgs, watched = [], []
    for g, (n, _node) in enumerate(groups):
        folder = str(Path(tmp, f"cache-{mode}-{backend}-{g}"))
        watched.append(folder)
        for r in range(g * n, (g + 1) * n):
            cfgs.append(
                dict(ranks[r], spec=f"s3://{BUCKET}/{PREFIX}", cache_dir=folder, cache_limit=facts["limit"],
                     local_world_size=lws)
            )  # fmt: skip
    # one sampler per cache folder: run the groups together, watch each
    ctx_peaks = [0] * len(groups)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            for g, f in enumerate(watched):
                if os.path.isdir(f):
                    ctx_peaks[g] = max(ctx_peaks[g], folder_bytes(f))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    remote = spawn(cfgs)
    stop.set()
    t.join()
    peaks = ctx_peaks
    rates = per_epoch_rates(remote)
    results["s3_img_s"] = [round(x, 1) for x in rates]
    floors = [
        node_floor(facts["counts"], facts["sizes"], range(g * n, (g + 1) * n), common, world, facts)
        for g, (n, _node) in enumerate(groups)
    ]
    # what the wire allows: the epoch's images over the floor bytes at the cap (one proxy: the
    # two nodes of two-nodes share its one wire)
    wire = [rates_images(remote, e) / (sum(f[e] for f in floors) / bw) for e in range(len(rates))]
    results["wire_img_s"] = [round(w, 1) for w in wire]
    limits = [min(lo, w) for lo, w in zip(results["local_img_s"], wire, strict=True)]
    results["cold_vs_limit"] = round(rates[0] / limits[0], 3)
    if len(rates) > 1:
        results["warm_vs_limit"] = round(sum(rates[1:]) / sum(limits[1:]), 3)
    got = [sum(r["epochs"][-1]["downloaded"] for r in remote[g * n : (g + 1) * n]) for g, (n, _) in enumerate(groups)]
    floor = [sum(f) for f in floors]
    results.update(
        downloaded_mb=[round(x / 1e6, 1) for x in got],
        floor_mb=[round(x / 1e6, 1) for x in floor],
        bytes_vs_floor=[round(x / f, 3) for x, f in zip(got, floor, strict=True)],
        share_of_set_per_epoch=[round(x / len(rates) / facts["set_bytes"], 3) for x in got],
        peak_mb=[round(p / 1e6, 1) for p in peaks],
        limit_mb=round(facts["limit"] / 1e6, 1),
        limit_plus_2_largest_mb=round((facts["limit"] + 2 * facts["largest"]) / 1e6, 1),
        set_mb=round(facts["set_bytes"] / 1e6, 1),
    )
    return results


def rates_images(ranks: list[dict], epoch: int) -> int:
    return sum(r["epochs"][epoch]["images"] for r in ranks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=str(default_photos()), help="folder of n<wnid>_*.JPEG photos (default: %(default)s)")
    ap.add_argument("--copies", type=int, default=8, help="times each photo is repeated (default 8)")
    ap.add_argument("--shard-mb", type=float, default=4, help="about this many MB a shard (default 4)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs each run reads (default 3: one cold, two warm)")
    ap.add_argument("--limit-share", type=float, default=0.5, help="cache limit as a share of the set (default 0.5)")
    ap.add_argument("--modes", default="single,node,two-nodes", help="comma-separated: single, node, two-nodes")
    ap.add_argument("--backends", default="pytorch", help="comma-separated: pytorch, dali (default pytorch)")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank (default 32)")
    ap.add_argument("--workers", type=int, default=1, help="DALI threads / DataLoader workers per rank (default 1)")
    ap.add_argument("--image-size", type=int, default=64, help="default 64 (small: the 2-core machine decodes)")
    ap.add_argument("--latency", type=float, default=0.025, help="seconds the proxy adds per request (default 0.025)")
    ap.add_argument("--bandwidth-mb", type=float, default=20, help="the wire: MB/s all responses share (default 20)")
    ap.add_argument("--json", action="store_true", help="end with one line of JSON holding the results")
    args = ap.parse_args()

    from loaders.bench_data import build_bench_shards

    photos = sorted(Path(args.photos).glob("*.JPEG"))
    total_bytes = args.copies * sum(p.stat().st_size for p in photos)
    count = max(1, round(total_bytes / (args.shard_mb * 1e6)))
    per_shard = math.ceil(args.copies * len(photos) / count)
    bw = args.bandwidth_mb * 1e6
    results: dict = {"load_at_start": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, "local")
        build_bench_shards(str(args.photos), str(local), args.copies, per_shard)
        m = json.loads((local / "manifest.json").read_text())
        shards = m["splits"]["train"]["shards"]
        set_bytes = sum(s["bytes"] for s in shards)
        idx_bytes = sum((local / s["index"]).stat().st_size for s in shards)
        limit = int(args.limit_share * set_bytes)
        largest = max(s["bytes"] for s in shards)
        facts = {
            "limit": limit,
            "largest": largest,
            "set_bytes": set_bytes,
            "idx_bytes": idx_bytes,
            "counts": [s["samples"] for s in shards],
            "sizes": [s["bytes"] for s in shards],
        }
        results["set"] = {
            "samples": m["splits"]["train"]["samples"],
            "shards": len(shards),
            "mb": round(set_bytes / 1e6, 1),
            "largest_mb": round(largest / 1e6, 2),
            "cache_limit_mb": round(limit / 1e6, 1),
        }
        print(f"set: {results['set']}", flush=True)
        moto, endpoint = start_moto()
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        os.environ.pop("LOCAL_WORLD_SIZE", None)
        try:
            upload(endpoint, local)
            with FaultyS3Proxy(endpoint, latency=args.latency, bandwidth=bw) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                common = dict(
                    epochs=args.epochs, batch_size=args.batch_size, workers=args.workers, image_size=args.image_size
                )
                for mode in args.modes.split(","):
                    for backend in args.backends.split(","):
                        t0 = time.time()
                        r = run_mode(mode, backend, common, local, tmp, facts, bw)
                        r["seconds"] = round(time.time() - t0, 1)
                        results[f"{mode}/{backend}"] = r
                        print(f"{mode}/{backend}: {json.dumps(r)}", flush=True)
        finally:
            moto.terminate()
            moto.wait(30)
    results["load_at_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
