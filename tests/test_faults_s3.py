"""S3 answering 500 or throttling (503 SlowDown) for a while, then recovering."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import fsspec
from faulty_s3_proxy import FaultyS3Proxy
from helpers import PhotoSource, build_photo_shards
from s3_server import moto_s3

from shards import storage
from shards.build import build
from shards.types import Options


def test_build_to_s3_survives_500s_and_throttling(tmp_path, monkeypatch):
    clean = build_photo_shards(tmp_path / "clean")
    # Few botocore attempts per call, so the outage outlasts them and our own retries count too.
    monkeypatch.setattr(storage, "S3_OPTIONS", {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}})
    with moto_s3() as endpoint, FaultyS3Proxy(endpoint, failures=8) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fsspec.filesystem("s3").invalidate_cache()
        m = build(PhotoSource(), "s3://team-data/flaky", Options(seed=1, shard_samples=7), workers=1)
        assert proxy.failures_left == 0 and {500, 503} <= set(proxy.errors_sent)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        for split in ("train", "val"):
            assert m["splits"][split]["shards"] == clean["splits"][split]["shards"]
            for s in m["splits"][split]["shards"]:
                remote = fs.cat(f"team-data/flaky/{s['name']}")
                assert hashlib.sha256(remote).hexdigest() == s["sha256"]
                assert remote == (tmp_path / "clean" / s["name"]).read_bytes()
        names = [os.path.basename(p) for p in fs.ls("team-data/flaky", detail=False, refresh=True)]
        assert not any(".tmp-" in n for n in names) and "_progress" not in names


def test_kill_9_during_s3_build_then_rerun_is_byte_identical(tmp_path):
    options = Options(seed=1, shard_samples=2)
    clean = build(PhotoSource(), str(tmp_path / "clean"), options, workers=1)
    tests_dir = os.path.dirname(__file__)
    code = (
        f"import sys; sys.path.insert(0, {tests_dir!r}); from helpers import PhotoSource; "
        "from shards.build import build; from shards.types import Options; "
        "build(PhotoSource(), 's3://team-data/killed', Options(seed=1, shard_samples=2), workers=1)"
    )
    with moto_s3():
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        proc = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "build ended before it could be killed"
            fs.invalidate_cache()
            if sum(p.endswith(".tar") for p in fs.find("team-data/killed")) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not fs.exists("team-data/killed/manifest.json")
        records = []
        m = build(PhotoSource(), "s3://team-data/killed", options, workers=1, progress=records.append)
        assert any(r.reused for r in records)  # what the dead run published was kept
        fs.invalidate_cache()
        assert m["splits"] == clean["splits"]
        for split in m["splits"].values():
            for s in split["shards"]:
                assert fs.cat(f"team-data/killed/{s['name']}") == (tmp_path / "clean" / s["name"]).read_bytes()
        assert not any(".tmp-" in p or "_progress" in p for p in fs.find("team-data/killed"))
