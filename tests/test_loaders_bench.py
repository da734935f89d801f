"""`python -m loaders.bench` end to end on tiny settings: the table, and the --json line's contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build_photo_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_json_has_the_backend_and_the_baseline(tmp_path):
    build_photo_shards(tmp_path / "shards", shard_samples=7)
    cmd = [
        sys.executable,
        "-m",
        "loaders.bench",
        "--shards",
        str(tmp_path / "shards"),
        "--backend",
        "dali",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--image-size",
        "32",
        "--seconds",
        "1",
        "--warmup",
        "0.5",
        "--json",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {r["backend"]: r for r in doc["results"]}
    assert list(rows) == ["dali", "imagefolder"]  # pytorch and --synthetic share this code path
    for r in rows.values():
        assert "error" not in r, r
        assert r["device"] == "cpu" and r["images_per_sec"] > 0 and r["images"] > 0
        assert r["batch_ms_p50"] <= r["batch_ms_p99"] and r["peak_rss_mb"] > 0
    assert "vs ImageFolder" in out.stdout  # the rich table came first


def test_bench_rejects_an_unknown_backend(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "loaders.bench", "--shards", str(tmp_path), "--backend", "tf"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "use dali or pytorch" in out.stderr
