"""The DALI backend on a remote set: one pipeline an epoch, fed from the shard cache as shards land.

A real S3 endpoint (moto's server on loopback) holding tests/helpers.py's photos in shards of
3 samples (train: 48 samples in 16 shards, val: 24 in 8), read through a cache whose limit is 4
shards, so every epoch evicts and downloads again. Real DALI pipelines in CPU mode, compared
with the same backend on the local copy of the set: images and labels bit for bit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import boto3
import pytest
import torch
from helpers import build_photo_shards
from s3_server import serving

from loaders import make_loader

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
BUCKET = "dali-remote"
SPEC = f"s3://{BUCKET}/photos"
SEED = 5


@pytest.fixture(scope="module")
def local_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build_photo_shards(out, shard_samples=3, num_classes=24, copies=2, val_copies=1)
    return out


@pytest.fixture(scope="module")
def s3(local_set):
    with serving(local_set, BUCKET, "photos") as endpoint:
        yield endpoint


def limit_below_the_set(local_set: Path, split: str = "train") -> int:
    sizes = [s["bytes"] for s in json.loads((local_set / "manifest.json").read_text())["splits"][split]["shards"]]
    limit = 4 * max(sizes)
    assert limit < sum(sizes)  # train: a quarter of the set, val: half; every epoch evicts
    return limit


def loader(spec, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("train", True)
    kw.setdefault("image_size", 32)
    kw.setdefault("workers", 1)
    return make_loader(spec, backend="dali", seed=SEED, **kw)


def read(ld, batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for n, (x, y) in enumerate(ld):
        out.append((x.clone(), y.clone()))
        if batches is not None and n + 1 == batches:
            break
    return out


def assert_same(got, expect) -> None:
    assert len(got) == len(expect)
    for b, ((x1, y1), (x2, y2)) in enumerate(zip(got, expect, strict=True)):
        assert torch.equal(y1, y2), b
        assert torch.equal(x1, x2), b  # the same bytes, crops and decoders: the same pixels


def test_dali_builds_one_pipeline_per_epoch_from_a_remote_set(local_set, s3, tmp_path):
    remote = loader(SPEC, cache_dir=tmp_path / "cache", cache_limit=limit_below_the_set(local_set))
    local = loader(local_set)
    for epoch in (0, 1):
        remote.set_epoch(epoch)
        local.set_epoch(epoch)
        assert_same(read(remote), read(local))
    assert len(remote.backend.builds) == 2 == len(local.backend.builds)
    assert all(s >= 0 for s in remote.backend.builds)
    remote.close()
    local.close()


def test_resume_mid_epoch_from_a_remote_set_equals_the_uninterrupted_epoch(local_set, s3, tmp_path):
    kw = dict(cache_dir=tmp_path / "cache", cache_limit=limit_below_the_set(local_set))
    whole = loader(SPEC, **kw)
    whole.set_epoch(1)
    expect = read(whole)
    whole.close()
    first = loader(SPEC, **kw)
    first.set_epoch(1)
    head = read(first, 3)  # stopped mid-epoch, with batches in DALI's queue and read ahead
    state = first.state_dict()
    first.close()
    resumed = loader(SPEC, **kw)
    resumed.load_state_dict(state)
    assert_same(head + read(resumed), expect)
    assert len(resumed.backend.builds) == 1
    local = loader(local_set)  # and both equal local disk's epoch
    local.set_epoch(1)
    assert_same(expect, read(local))
    resumed.close()
    local.close()


def test_an_elastic_resume_on_a_remote_set_equals_local_disk(local_set, s3, tmp_path):
    # a state taken by rank 1 of 2, taken up by one rank with another batch size: the rest of
    # the epoch from s3:// as from local disk, pixel for pixel
    two = loader(local_set, rank=1, world_size=2, batch_size=3, drop_last=False)
    two.set_epoch(1)
    read(two, 2)
    state = two.state_dict()
    remote = loader(SPEC, cache_dir=tmp_path / "cache", cache_limit=limit_below_the_set(local_set), batch_size=5)
    local = loader(local_set, batch_size=5)
    for ld in (remote, local):
        ld.load_state_dict(state)
    got, expect = read(remote), read(local)
    assert len(got) > 3
    assert_same(got, expect)
    for ld in (two, remote, local):
        ld.close()


def test_remote_eval_pipeline_is_built_once_and_equals_local_disk(local_set, s3, tmp_path):
    kw = dict(train=False, batch_size=5)
    remote = loader(SPEC, cache_dir=tmp_path / "cache", cache_limit=limit_below_the_set(local_set, "val"), **kw)
    expect = read(loader(local_set, **kw))
    for _ in range(3):
        remote.set_epoch(0)
        assert_same(read(remote), expect)
    assert len(remote.backend.builds) == 1
    remote.close()


def test_gpu_decoder_hints_of_a_remote_set_come_from_its_images(local_set):
    from loaders.common import read_image_bytes
    from loaders.dali import IMAGENET_HINTS, DaliOptions, gpu_decoder_hints
    from loaders.spec import open_shards

    shards, _ = open_shards(local_set, split="train")
    idx = shards[0].index()
    biggest = read_image_bytes(shards[0], int(idx.image_size.argmax()))
    # given the image a remote set's first batch read from the cache: the same hints as from disk
    assert gpu_decoder_hints(shards, DaliOptions(), biggest) == gpu_decoder_hints(shards, DaliOptions())
    assert (
        gpu_decoder_hints(shards, DaliOptions(), biggest)["preallocate_width_hint"]
        < (IMAGENET_HINTS["preallocate_width_hint"])
    )


def test_an_old_dali_is_refused_in_one_line_naming_both_versions():
    from loaders.dali import check_dali_version

    with pytest.raises(ImportError) as e:
        check_dali_version("1.52.0")
    msg = str(e.value)
    assert "1.52.0" in msg and "2.0 or newer" in msg and "\n" not in msg
    for fine in ("2.0.0", "2.4.0", "2.5.0.dev20260101", "10.1"):
        check_dali_version(fine)


@pytest.mark.parametrize("train", [True, False])
def test_the_gpu_graph_fed_from_the_cache_is_defined_without_a_gpu(local_set, train):
    # DALI checks every operator argument while the graph is defined: the mixed decoder and the
    # GPU operators after it take the cache's external source as they take the webdataset reader.
    from nvidia.dali import types

    from loaders.dali import CachedInput, DaliOptions, image_pipeline
    from loaders.spec import open_shards

    shards, _ = open_shards(local_set, split="train")
    pipe = image_pipeline(
        [],
        [],
        train=train,
        image_size=224,
        gpu=True,
        out_dtype=types.FLOAT16,
        layout="HWC",
        opts=DaliOptions(),
        source=CachedInput(shards),
        batch_size=8,
        num_threads=4,
        device_id=0,
        seed=1,
    )
    assert [node.device for node in pipe._graph_out] == ["gpu", "gpu"]


def test_a_one_batch_remote_eval_equals_local_disk_every_pass(local_set, s3, tmp_path):
    # one batch, a queue of 2: the pipeline's first prefetch asks past the plan's end
    kw = dict(train=False, batch_size=24, drop_last=False)
    remote = loader(SPEC, cache_dir=tmp_path / "cache", **kw)
    expect = read(loader(local_set, **kw))
    assert len(expect) == 1
    for _ in range(2):
        remote.set_epoch(0)
        assert_same(read(remote), expect)
    remote.close()


def test_an_undecodable_image_in_a_remote_set_is_named(local_set, s3, tmp_path):
    from loaders import DecodeError
    from loaders.spec import parse_index

    # No manifest (so no sha256 to refuse the damaged copy): the bare shards of the val split,
    # sample 2 of shard 001 garbled.
    client = boto3.client("s3", endpoint_url=s3)
    for p in local_set.glob("photos-val-*"):
        body = p.read_bytes()
        if p.name == "photos-val-001.tar":
            offset = int(parse_index((local_set / "photos-val-001.idx").read_text(), "x").image_offset[2])
            body = body[:offset] + b"not a jpeg" * 200 + body[offset + 2000 :]
        client.put_object(Bucket=BUCKET, Key=f"bare/{p.name}", Body=body)
    key = (local_set / "photos-val-001.idx").read_text().splitlines()[3].split()[3].split(".")[0]
    ld = loader(f"s3://{BUCKET}/bare/photos-val-{{000..007}}.tar", train=False, cache_dir=tmp_path / "cache")
    with pytest.raises(DecodeError) as e:
        read(ld)
    assert "photos-val-001.tar" in str(e.value) and key in str(e.value)
    ld.close()
