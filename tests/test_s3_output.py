"""Shards on object storage: build to s3:// on a real (moto) S3 endpoint over HTTP, read back, verify."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import fsspec
import pytest
from helpers import PhotoSource, build_photo_shards
from s3_server import moto_s3

from shards.build import BuildError, build, check_output, prepare, write_shard
from shards.manifest import read_manifest, resolve_spec
from shards.storage import Storage
from shards.types import Options


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


def _digests(fs, prefix: str) -> dict[str, str]:
    return {
        p.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat(p)).hexdigest()
        for p in fs.ls(prefix, detail=False, refresh=True)
        if p.endswith((".tar", ".idx"))
    }


def test_build_to_s3_equals_local_build_and_verifies(s3, tmp_path):
    m = build_photo_shards("s3://team-data/photos")
    local = build_photo_shards(tmp_path / "local")
    assert m["splits"]["train"]["shards"] == local["splits"]["train"]["shards"]
    fs = fsspec.filesystem("s3")
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("team-data/photos", detail=False, refresh=True)}
    assert "manifest.json" in names and "_progress" not in names
    assert not any(".tmp-" in n for n in names)
    assert read_manifest("s3://team-data/photos")["splits"]["val"]["samples"] == 24
    refs, _ = resolve_spec("s3://team-data/photos", split="train")
    assert refs[0].url.startswith("s3://team-data/photos/") and refs[0].samples
    r = subprocess.run(
        [sys.executable, "-m", "shards", "verify", "s3://team-data/photos"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    # Corrupt one object: verify names it and fails.
    fs.pipe("team-data/photos/photos-train-001.tar", fs.cat("team-data/photos/photos-train-002.tar"))
    r = subprocess.run(
        [sys.executable, "-m", "shards", "verify", "s3://team-data/photos"], capture_output=True, text=True
    )
    assert r.returncode == 1 and "photos-train-001.tar" in r.stderr


def test_rerun_after_partial_s3_build_reuses_published_shards(s3):
    fs = fsspec.filesystem("s3")
    build_photo_shards("s3://team-data/clean")
    source, options, out = PhotoSource(), Options(seed=1, shard_samples=7), "s3://team-data/again"
    # A run that died after publishing three shards (and before the manifest).
    plan = prepare(source, options)
    storage = Storage(out)
    check_output(storage, plan)
    for spec in plan.shards[:3]:
        write_shard(source, spec, storage, options, plan.params)
    records = []
    build(source, out, options, workers=1, progress=records.append)
    assert sorted(r.name for r in records if r.reused) == sorted(s.name for s in plan.shards[:3])
    assert _digests(fs, "team-data/again") == _digests(fs, "team-data/clean")


def test_missing_bucket_fails_in_one_line_before_any_work(s3):
    with pytest.raises(BuildError) as e:
        build(PhotoSource(), "s3://no-such-bucket/x", Options(seed=1, shard_samples=7), workers=1)
    assert "no-such-bucket" in str(e.value) and "\n" not in str(e.value)


def test_incomplete_multipart_uploads_under_the_output_are_aborted(s3):
    import boto3

    client = boto3.client("s3")
    client.create_multipart_upload(Bucket="team-data", Key="mpu/photos-train-000.tar")
    client.create_multipart_upload(Bucket="team-data", Key="elsewhere/keep.tar")
    build(PhotoSource(), "s3://team-data/mpu", Options(seed=1, shard_samples=7), workers=1)
    left = [u["Key"] for u in client.list_multipart_uploads(Bucket="team-data").get("Uploads", [])]
    assert left == ["elsewhere/keep.tar"]
