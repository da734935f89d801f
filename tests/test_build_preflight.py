"""Preflight: a local output that cannot hold the set fails at once, saying how much is needed."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
from helpers import PhotoSource

import shards.build as sb
from shards.build import BuildError, build, estimated_bytes, prepare
from shards.types import Options

OPTIONS = Options(seed=1, shard_samples=10)
Usage = namedtuple("Usage", "total used free")


def test_a_full_disk_fails_before_anything_is_written(tmp_path, monkeypatch):
    source = PhotoSource(copies=1)
    need = estimated_bytes(prepare(source, OPTIONS))
    monkeypatch.setattr(sb.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 200_000, 200_000))
    out = tmp_path / "out"
    with pytest.raises(BuildError) as e:
        build(source, str(out), OPTIONS, workers=1)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"not enough free space at {out}")
    assert f"need about {need / 1e6:.1f} MB, 0.2 MB is free" in message and "choose another --output" in message
    assert not out.exists()  # nothing written, not even the folder


def test_the_estimate_covers_what_is_written(tmp_path):
    source = PhotoSource(copies=1)
    estimate = estimated_bytes(prepare(source, OPTIONS))
    build(source, str(tmp_path / "out"), OPTIONS, workers=1)
    written = sum(p.stat().st_size for p in (tmp_path / "out").iterdir() if p.suffix in (".tar", ".idx"))
    assert written <= estimate < 1.5 * written
    assert shutil.disk_usage(tmp_path).free > estimate  # so the real check let this build through
