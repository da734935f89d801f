"""The shard cache as a node uses it (loaders/cache/): 8 ranks on one folder and one budget, the
node plan's eviction, a full disk, a limit too small, a damaged index, an object replaced mid-download.

A real S3 endpoint (moto's server on loopback), the photo shards of tests/helpers.py (3 samples a
shard), real processes for the ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import s3fs
from faulty_s3_proxy import FaultyS3Proxy
from helpers import build_photo_shards
from s3_server import serving

from loaders import make_loader
from loaders.cache import PART, CacheError, NodePlan, Remote, ShardCache
from loaders.cache.download import Downloader, Local
from loaders.cache.folder import CacheFolder
from loaders.sharding import EpochPlan

logging.getLogger("werkzeug").setLevel(logging.WARNING)
BUCKET, PREFIX = "node-tests", "photos"
SPEC = f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture(scope="module")
def local_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build_photo_shards(out, shard_samples=3, num_classes=24, copies=2, val_copies=1)
    return out


@pytest.fixture(scope="module")
def s3(local_set):
    with serving(local_set, BUCKET, PREFIX) as endpoint:
        yield endpoint


def entries(local_set: Path, split: str) -> list[dict]:
    return json.loads((local_set / "manifest.json").read_text())["splits"][split]["shards"]


def remotes(local_set: Path, split: str, prefix: str = PREFIX) -> list[Remote]:
    return [Remote(f"s3://{BUCKET}/{prefix}/{e['name']}", e["bytes"], e["sha256"]) for e in entries(local_set, split)]


def labels(ld) -> list[list[int]]:
    return [y.tolist() for _, y in ld]


RANK = """
import json, os, sys
from loaders import make_loader
spec, folder, limit, rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ld = make_loader(spec, batch_size=2, train=True, split="train", backend="pytorch", workers=0, image_size=16,
                 cache_dir=folder, cache_limit=limit, rank=rank, world_size=8, seed=5)
out = []
for epoch in (0, 1):
    ld.set_epoch(epoch)
    out.append([y.tolist() for _, y in ld])
st = ld.cache.stats
print(json.dumps({"labels": out, "peak": st.peak_bytes, "misses": st.misses}))
ld.close()
"""


def test_eight_ranks_share_one_cache_within_the_budget_with_local_disk_labels(local_set, s3, tmp_path):
    folder = tmp_path / "cache"
    sizes = [e["bytes"] for e in entries(local_set, "train")]
    index_bytes = sum(p.stat().st_size for p in local_set.glob("*.idx"))
    limit = index_bytes + 9 * max(sizes)  # about half the 16 shards (the least 8 ranks may use is 8)
    budget = limit + 2 * max(sizes)
    peak, stop = [0], threading.Event()

    def watch() -> None:  # the folder's real size, every few ms: finished files and .part files alike
        while not stop.wait(0.005):
            total = 0
            for p in folder.glob("*") if folder.exists() else []:
                if not p.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        total += p.stat().st_size
            peak[0] = max(peak[0], total)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with FaultyS3Proxy(s3, latency=0.01) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": os.pathsep.join(sys.path)}
        env.pop("LOCAL_WORLD_SIZE", None)  # one node: all 8 ranks share the folder
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", RANK, SPEC, str(folder), str(limit), str(r)], env=env, stdout=subprocess.PIPE
            )
            for r in range(8)
        ]
        try:
            results = [json.loads(p.communicate(timeout=300)[0].decode().strip().splitlines()[-1]) for p in ranks]
        finally:
            for p in ranks:
                p.kill()
                p.wait()
        stop.set()
        watcher.join()
    assert [p.returncode for p in ranks] == [0] * 8
    for r, res in enumerate(results):
        ref = make_loader(
            local_set, batch_size=2, train=True, split="train", backend="pytorch", workers=0, image_size=16,
            rank=r, world_size=8, seed=5,
        )  # fmt: skip
        want = []
        for epoch in (0, 1):
            ref.set_epoch(epoch)
            want.append(labels(ref))
        assert res["labels"] == want, r
        assert res["peak"] <= budget, (r, res["peak"], budget)
    assert 0 < peak[0] <= budget, (peak[0], budget)
    # each epoch downloads what the cache cannot keep; every shard crossed the wire at most once an epoch
    assert len(sizes) <= sum(r["misses"] for r in results) <= 2 * len(sizes)


def plan(shards: list[int]) -> EpochPlan:
    n = len(shards)
    return EpochPlan(np.array(shards, np.int32), np.zeros(n, np.int32), np.ones(n, bool), 1)


@pytest.mark.parametrize("node_wide", [True, False])
def test_eviction_keeps_the_shard_another_local_rank_reads_next(local_set, s3, tmp_path, node_wide):
    """Rank A reads shards 0, 1, 2 (batches 0-2), then 0 again at batch 5; rank B reads 1 at batch 3.
    For shard 2 one of 0 and 1 must go: by the node plan 0 (next used at 5), not 1 (at 3)."""
    tars = remotes(local_set, "val")[:3]
    sizes = [e["bytes"] for e in entries(local_set, "val")[:3]]
    limit = sizes[0] + sizes[1] + max(sizes) // 2  # room for two, not three
    cache = ShardCache(tars, [], str(tmp_path / "cache"), limit, in_flight=0)
    a, b = [0, 1, 2, 2, 2, 0], [2, 2, 2, 1, 1, 1]
    if node_wide:
        cache.announce(NodePlan.of_ranks([plan(a), plan(b)], [], own=0))
    cache.start_epoch([0, 1, 2, 0])  # rank A's occurrences
    for j in range(3):
        cache.get(j)
        cache.release(j)
    held = {s for s in range(3) if os.path.exists(cache.local_path(s))}
    assert held == ({1, 2} if node_wide else {0, 2})  # alone, rank A would evict the shard B needs next
    cache.close()


def test_a_limit_below_one_shard_is_refused_naming_the_least_that_works(local_set, s3, tmp_path):
    largest = max(e["bytes"] for e in entries(local_set, "val"))
    with pytest.raises(CacheError) as e:
        ShardCache(remotes(local_set, "val"), [], str(tmp_path), largest - 1)
    msg = str(e.value)
    assert "\n" not in msg and f"use at least {largest / 1e6:.1f} MB" in msg
    with pytest.raises(CacheError, match="use at least"):  # 4 local ranks need 4 shards' room
        make_loader(SPEC, batch_size=2, train=False, backend="pytorch", workers=0, cache_dir=tmp_path / "c",
                    cache_limit=3 * largest, rank=0, world_size=4)  # fmt: skip


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs of the size asked for (a real ENOSPC), unmounted afterwards."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        pages = -(-size // 4096) * 4096
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages}", "tmpfs", str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_full_disk_with_evictable_shards_goes_on(local_set, s3, tmpfs):
    sizes = [e["bytes"] for e in entries(local_set, "val")]
    index_bytes = sum(p.stat().st_size for p in local_set.glob("*val*.idx"))
    folder = tmpfs(index_bytes + 4 * max(sizes) + 64 * 4096)  # a few shards fit, not the 8 of the split
    assert sum(sizes) > 4 * max(sizes)
    ld = make_loader(SPEC, batch_size=4, train=False, backend="pytorch", workers=0, image_size=16,
                     cache_dir=folder, cache_limit="10GB")  # fmt: skip
    ref = make_loader(local_set, batch_size=4, train=False, backend="pytorch", workers=0, image_size=16)
    assert labels(ld) == labels(ref)
    assert ld.cache.stats.evicted > 0  # the disk, not the limit, made it evict
    ld.close()
    assert not [p for p in folder.iterdir() if PART in p.name]


def damaged_copy(local_set: Path, s3: str, prefix: str, edit) -> str:
    """The val split under another prefix, with shard 0's index edited by `edit(text) -> text`."""
    client = boto3.client("s3", endpoint_url=s3)
    first = entries(local_set, "val")[0]["index"]
    for p in local_set.iterdir():
        body = p.read_bytes()
        if p.name == first:
            body = edit(body.decode()).encode()
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{p.name}", Body=body)
    return f"s3://{BUCKET}/{prefix}"


def test_a_damaged_index_is_caught_naming_it(local_set, s3, tmp_path):
    name = entries(local_set, "val")[0]["index"]
    # a truncated index: its last sample's members run past the tar's end... or do not parse
    lines = (local_set / name).read_text().splitlines()
    header, rows = lines[0], lines[1:]
    shifted = rows[-1].split()
    shifted[1] = str(int(shifted[1]) + 10 * 512 * 1024)  # the first member's offset, far past the tar's end
    spec = damaged_copy(local_set, s3, "past-end", lambda t: "\n".join([header, *rows[:-1], " ".join(shifted)]) + "\n")
    with pytest.raises(CacheError) as e:
        make_loader(spec, batch_size=4, train=False, backend="pytorch", workers=0, cache_dir=tmp_path / "a")
    assert f"{spec}/{name}: damaged index" in str(e.value) and "\n" not in str(e.value)
    # a wrong member size: still inside the tar, caught against the tar's own header once it lands
    fields = rows[0].split()
    fields[2] = str(int(fields[2]) - 1)
    spec = damaged_copy(local_set, s3, "wrong-size", lambda t: "\n".join([header, " ".join(fields), *rows[1:]]) + "\n")
    ld = make_loader(spec, batch_size=4, train=False, backend="pytorch", workers=0, cache_dir=tmp_path / "b")
    with pytest.raises(CacheError) as e:
        labels(ld)
    assert f"{spec}/{name}: damaged index: sample 0" in str(e.value) and "\n" not in str(e.value)
    ld.close()


def test_an_object_replaced_mid_download_is_caught_by_its_etag(local_set, s3, tmp_path, caplog):
    entry = max(entries(local_set, "val"), key=lambda e: e["bytes"])
    key = f"{PREFIX}/{entry['name']}"
    good = (local_set / entry["name"]).read_bytes()
    other = bytes(reversed(good))  # same size, another version
    client = boto3.client("s3", endpoint_url=s3)
    gets = []

    def replace_after_first_get(method: str, path: str) -> None:
        if method == "GET" and path.endswith(key):
            gets.append(path)
            if len(gets) == 2:  # the first ranged GET went through: now the object changes
                client.put_object(Bucket=BUCKET, Key=key, Body=other)

    url = f"{SPEC}/{entry['name']}"
    try:
        for sha, words in ((None, "replaced in the store while it downloaded"), (entry["sha256"], "sha256")):
            client.put_object(Bucket=BUCKET, Key=key, Body=good)
            gets.clear()
            with FaultyS3Proxy(s3, before_forward=replace_after_first_get) as proxy:
                saved = os.environ["AWS_ENDPOINT_URL"]
                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                s3fs.S3FileSystem.clear_instance_cache()
                try:
                    folder = tmp_path / f"cache-{sha is None}"
                    cache = ShardCache([Remote(url, entry["bytes"] if sha else None, sha)], [], str(folder),
                                       in_flight=0, part_bytes=8192)  # fmt: skip
                    cache.start_epoch([0])
                    with pytest.raises(CacheError) as e:
                        cache.get(0)
                    cache.close()
                finally:
                    os.environ["AWS_ENDPOINT_URL"] = saved
                    s3fs.S3FileSystem.clear_instance_cache()
            assert 412 in proxy.statuses  # the pinned GET was refused: no byte of the new version mixed in
            assert url in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
            assert not [p for p in folder.iterdir() if p.name.endswith(".tar") or PART in p.name]
        assert any("downloading the new version" in r.message for r in caplog.records)  # with a manifest: once more
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=good)


def test_a_download_nobody_waits_for_yields_the_wire_to_one_a_reader_waits_for(tmp_path):
    folder = CacheFolder(str(tmp_path), 10**9, 10, keep=lambda name: False)
    dl = Downloader(folder, lambda: False, lambda *a: None)
    ahead, now = Local(Remote("s3://b/ahead.tar", 1, None), "t", 1), Local(Remote("s3://b/now.tar", 1, None), "t", 1)
    through = threading.Event()

    def prefetch_range() -> None:
        with contextlib.ExitStack() as stack:
            dl._yield_wire(ahead, lambda: False, stack, [])
        through.set()

    with contextlib.ExitStack() as waited:  # a waited-for download marks itself urgent and goes on
        dl._yield_wire(now, lambda: True, waited, [])
        assert folder.others_urgent(ahead.name) and not folder.others_urgent(now.name)
        t = threading.Thread(target=prefetch_range)
        t.start()
        assert not through.wait(0.5)  # the prefetch holds its next GET while the urgent one transfers
    assert through.wait(30)
    t.join()
    dl.shutdown()
    folder.close()


def test_the_next_epochs_first_shard_is_fetched_during_this_epochs_tail(local_set, s3, tmp_path):
    tars = remotes(local_set, "val")[:3]
    cache = ShardCache(tars, [], str(tmp_path / "cache"))
    cache.announce(NodePlan.of_ranks([plan([0, 1])], [plan([2, 0])], own=0))  # epoch e: 0, 1; epoch e+1: 2, 0
    cache.start_epoch([0, 1])
    for j in range(2):
        cache.get(j)
    # the reader is still in epoch e (shard 1 held), and nobody asked for shard 2 yet
    deadline = time.monotonic() + 60
    while not os.path.exists(cache.local_path(2)):
        assert time.monotonic() < deadline, "the next epoch's first shard was not prefetched"
        time.sleep(0.05)
    cache.close()
