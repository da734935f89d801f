"""The shard cache (loaders/cache.py) against a real S3 endpoint: moto's server over loopback HTTP,
with a loopback proxy in front of it where faults, latency or request counts matter.

Shards: tests/helpers.py's photos, 24 classes, 3 samples a shard (val: 24 samples in 8 shards,
train: 48 in 16), so every label names one photo and a small limit forces evictions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import s3fs
from faulty_s3_proxy import FaultyS3Proxy
from helpers import PhotoSource, build_photo_shards
from s3_server import serving

from loaders import make_loader
from loaders.cache import PART, CacheError, Remote, ShardCache
from loaders.cache.folder import LEDGER_BYTES
from shards.build import build
from shards.types import Options

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
BUCKET, PREFIX = "cache-tests", "photos"
SPEC = f"s3://{BUCKET}/{PREFIX}"
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def local_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build_photo_shards(out, shard_samples=3, num_classes=24, copies=2, val_copies=1)
    return out


@pytest.fixture(scope="module")
def s3(local_set):
    """The endpoint URL, with the set uploaded under s3://cache-tests/photos (moto starts empty)."""
    with serving(local_set, BUCKET, PREFIX) as endpoint:
        yield endpoint


@contextlib.contextmanager
def endpoint(url: str):
    """Point every new S3 client (this process and its children) at `url`."""
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = url
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        s3fs.S3FileSystem.clear_instance_cache()


def loader(spec, backend, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("train", False)
    kw.setdefault("image_size", 32)
    kw.setdefault("workers", 1)
    return make_loader(spec, backend=backend, **kw)


def batches(ld) -> list[list[int]]:
    return [labels.tolist() for _, labels in ld]


def tars(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tar"))


def shard_bytes(local_set: Path, split: str) -> list[int]:
    m = json.loads((local_set / "manifest.json").read_text())
    return [s["bytes"] for s in m["splits"][split]["shards"]]


@pytest.mark.parametrize("backend", ["dali", "pytorch"])
def test_same_batches_as_local_disk_epochs_and_resume(local_set, s3, tmp_path, backend):
    kw = dict(train=True, seed=3, cache_dir=tmp_path / "cache")
    local, remote = loader(local_set, backend, seed=3, train=True), loader(SPEC, backend, **kw)
    for epoch in (0, 1):
        local.set_epoch(epoch)
        remote.set_epoch(epoch)
        assert batches(remote) == batches(local), epoch
    # resume mid-epoch from the remote set: the rest of epoch 1, as from local disk
    local.set_epoch(1)
    expect = batches(local)
    it = iter(remote)
    head = [next(it)[1].tolist() for _ in range(3)]
    state = remote.state_dict()
    remote.close()
    resumed = loader(SPEC, backend, **kw)
    resumed.load_state_dict(state)
    assert head + batches(resumed) == expect
    assert resumed.cache.stats.misses == 0  # the limit holds the whole set: no second download
    local.close()
    resumed.close()


@pytest.mark.parametrize("backend", ["dali", "pytorch"])
def test_eviction_under_a_small_limit_keeps_the_order(local_set, s3, tmp_path, backend):
    sizes = shard_bytes(local_set, "train")
    limit = 4 * max(sizes)
    folder = tmp_path / "cache"
    # workers=0: the DataLoader asks for one batch at a time, so only the shards of about one
    # batch are held past the limit by the reader
    w = 0 if backend == "pytorch" else 1
    ld = loader(SPEC, backend, split="train", train=True, cache_dir=folder, cache_limit=limit, workers=w)
    ref = loader(local_set, backend, split="train", train=True, workers=w)
    got = batches(ld)
    assert got == batches(ref)
    st = ld.cache.stats
    assert st.evicted > 0 and st.misses >= len(sizes)
    # the limit plus the shards in flight bounds what the folder ever held
    assert st.peak_bytes <= limit + ld.cache.in_flight * max(sizes) + sum(
        p.stat().st_size for p in folder.glob("*.idx")
    )
    ld.close()  # until then the next epoch's first shards may be in flight, above the limit
    on_disk = sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(".tar"))
    assert on_disk <= limit
    ref.close()


def test_bad_limits_fail_in_one_line_naming_the_option(tmp_path):
    for bad in ("lots", "-3GB", "0", 0):
        with pytest.raises(ValueError, match="cache_limit") as e:
            ShardCache([], [], str(tmp_path), bad)
        assert "\n" not in str(e.value)


def test_sha256_mismatch_downloads_once_more_then_fails_naming_the_url(local_set, s3, tmp_path, caplog):
    client = boto3.client("s3", endpoint_url=s3)
    name = "photos-val-001.tar"
    good = (local_set / name).read_bytes()
    bad = bytearray(good)
    bad[1000] ^= 0xFF  # same size, other bytes: only the digest can tell
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}", Body=bytes(bad))
    try:
        ld = loader(SPEC, "pytorch", cache_dir=tmp_path / "cache", workers=0)
        with pytest.raises(CacheError) as e:
            batches(ld)
        msg = str(e.value)
        assert f"{SPEC}/{name}" in msg and "sha256" in msg and "\n" not in msg
        assert sum("downloading it once more" in r.message for r in caplog.records) == 1
        assert not [p for p in (tmp_path / "cache").iterdir() if name in p.name]  # nothing half-kept
        ld.close()
    finally:
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}", Body=good)


def test_a_rebuilt_set_replaces_the_cached_copies(local_set, s3, tmp_path):
    folder = tmp_path / "cache"
    ld = loader(SPEC, "pytorch", cache_dir=folder, workers=0)
    batches(ld)
    ld.close()
    old = tars(folder)
    # rebuild with another seed: other shard contents, same names
    client = boto3.client("s3", endpoint_url=s3)
    rebuilt = tmp_path / "rebuilt"
    build(
        PhotoSource(num_classes=24, copies=2, val_copies=1), str(rebuilt), Options(seed=9, shard_samples=3), workers=1
    )
    try:
        for p in rebuilt.iterdir():
            client.upload_file(str(p), BUCKET, f"{PREFIX}/{p.name}")
        ld = loader(SPEC, "pytorch", cache_dir=folder, workers=0)
        ref = loader(rebuilt, "pytorch", workers=0)
        assert batches(ld) == batches(ref)
        new = tars(folder)
        assert len(new) == len(old) and not set(new) & set(old)  # every old copy replaced
        ld.close()
        ref.close()
    finally:
        for p in local_set.iterdir():
            client.upload_file(str(p), BUCKET, f"{PREFIX}/{p.name}")


def test_503_and_slowdown_then_recovery_through_a_faulty_proxy(local_set, s3, tmp_path):
    with FaultyS3Proxy(s3, failures=0) as proxy, endpoint(proxy.url):
        ld = loader(SPEC, "dali", cache_dir=tmp_path / "cache")
        with proxy.lock:
            proxy.failures_left = 2  # the shard downloads meet a 500 and a 503 SlowDown
        assert batches(ld) == batches(loader(local_set, "dali"))
        assert proxy.errors_sent == [500, 503]
        assert ld.cache.stats.misses == 8
        ld.close()


@pytest.mark.parametrize("status,words", [(403, "access denied"), (404, "not found")])
def test_403_and_404_fail_at_once_naming_the_url(s3, tmp_path, status, words):
    with FaultyS3Proxy(s3, deny={"photos-val-002.tar": status}) as proxy, endpoint(proxy.url):
        ld = loader(SPEC, "pytorch", cache_dir=tmp_path / "cache", workers=0)
        start = time.monotonic()
        with pytest.raises(CacheError, match=f"{SPEC}/photos-val-002.tar: {words}") as e:
            batches(ld)
        assert "\n" not in str(e.value)
        assert proxy.errors_sent.count(status) == 1  # no retry
        assert time.monotonic() - start < 30
        ld.close()


CHILD_DOWNLOAD = """
import sys
from loaders.cache import Remote, ShardCache
url, size, sha, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
cache = ShardCache([Remote(url, size, sha)], [], folder)
cache.start_epoch([0])
cache.get(0)
"""


def test_a_lock_left_by_a_sigkilled_downloader_is_taken_over(local_set, s3, tmp_path):
    m = json.loads((local_set / "manifest.json").read_text())
    entry = m["splits"]["val"]["shards"][0]
    url, folder = f"{SPEC}/{entry['name']}", tmp_path / "cache"
    with FaultyS3Proxy(s3, latency=120) as slow:  # the child's GET hangs here until it is killed
        env = {**os.environ, "AWS_ENDPOINT_URL": slow.url, "PYTHONPATH": os.pathsep.join(sys.path)}
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_DOWNLOAD, url, str(entry["bytes"]), entry["sha256"], str(folder)], env=env
        )
        try:
            deadline = time.monotonic() + 60
            while not any(PART in p.name for p in folder.glob("*")) if folder.exists() else True:
                assert time.monotonic() < deadline and child.poll() is None, "the child never started its download"
                time.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        cache = ShardCache([Remote(url, entry["bytes"], entry["sha256"])], [], str(folder))
        cache.start_epoch([0])
        path = cache.get(0)
        assert Path(path).read_bytes() == (local_set / entry["name"]).read_bytes()
        assert not [p for p in folder.iterdir() if PART in p.name]  # the dead process's half-copy is gone
        cache.close()


TWO_READERS = """
import json, sys
from loaders import make_loader
ld = make_loader(sys.argv[1], batch_size=4, train=False, backend="pytorch", workers=0, image_size=32,
                 cache_dir=sys.argv[2], rank=int(sys.argv[3]), world_size=2)
labels = [l.tolist() for _, l in ld]
print(json.dumps({"labels": labels, "misses": ld.cache.stats.misses}))
"""


def test_two_processes_share_one_cache_and_download_each_shard_once(local_set, s3, tmp_path):
    """Rank 1 in a child process, rank 0 here at the same time, one cache folder."""
    folder = tmp_path / "cache"
    with FaultyS3Proxy(s3, latency=0.02) as proxy, endpoint(proxy.url):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        child = subprocess.Popen(
            [sys.executable, "-c", TWO_READERS, SPEC, str(folder), "1"], env=env, stdout=subprocess.PIPE
        )
        try:
            here = loader(SPEC, "pytorch", workers=0, rank=0, world_size=2, cache_dir=folder)
            mine = batches(here)
            theirs = json.loads(child.communicate(timeout=300)[0].decode().strip().splitlines()[-1])
        finally:
            child.kill()
            child.wait()
        assert child.returncode == 0
        gets = [path for method, path, _ in proxy.log if method == "GET" and path.endswith(".tar")]
    assert sorted(gets) == sorted(set(gets)) and len(gets) == 8  # every shard crossed the wire once
    ref = [loader(local_set, "pytorch", workers=0, rank=r, world_size=2) for r in (0, 1)]
    assert [mine, theirs["labels"]] == [batches(r) for r in ref]
    assert here.cache.stats.misses + theirs["misses"] == 8
    here.close()


def test_a_full_cache_disk_with_nothing_to_evict_fails_in_one_line_naming_the_folder(local_set, s3, tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    indexes = list(local_set.glob("*val*.idx"))
    # room for the indexes (a page each), not for one shard: nothing can be evicted for it
    size = -(-(LEDGER_BYTES + 4096 * len(indexes) + min(shard_bytes(local_set, "val")) // 2) // 4096) * 4096
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        ld = loader(SPEC, "pytorch", cache_dir=folder, cache_limit="10GB", workers=0)
        with pytest.raises(CacheError) as e:
            batches(ld)
        msg = str(e.value)
        assert f"shard cache {folder} is full" in msg and "nothing left to evict" in msg and "\n" not in msg
        ld.close()
        assert not [p for p in folder.iterdir() if PART in p.name]
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_waiting_reader_sees_progress_with_rate_and_eta(local_set, s3, tmp_path, capfd):
    m = json.loads((local_set / "manifest.json").read_text())
    entry = m["splits"]["val"]["shards"][0]
    with FaultyS3Proxy(s3, latency=1.5) as slow, endpoint(slow.url):  # the reader waits over a second
        cache = ShardCache(
            [Remote(f"{SPEC}/{entry['name']}", entry["bytes"], entry["sha256"])], [], str(tmp_path), verbose=True
        )
        cache.start_epoch([0])
        cache.get(0)
        cache.close()
    err = capfd.readouterr().err
    assert f"shard cache: waiting for {entry['name']}" in err and "MB/s, ETA" in err and "1 shards in flight" in err


def test_train_takes_cache_dir_and_limit():
    from train.config import parse

    cfg = parse(["--data", SPEC, "--cache-dir", "/nvme/cache", "--cache-limit", "200GB"])
    assert (cfg.cache_dir, cfg.cache_limit) == ("/nvme/cache", "200GB")
    assert parse(["--data", SPEC]).cache_limit is None
