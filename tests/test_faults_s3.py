"""S3 answering 500 or throttling (503 SlowDown) for a while, then recovering."""

from __future__ import annotations

import hashlib
import os

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
