"""The build-shards flow with a URL --source and an s3:// --output, under network faults.

Real parts throughout: the fixture's ILSVRC2012 archives served over loopback HTTP by a
server that drops connections mid-body and answers 503 (tests/faulty_http.py), a real S3
endpoint (moto's server mode, tests/s3_server.py), and the flow in a real temporary Prefect
server. Every case ends byte-identical to a clean local build with the same seed, or fails
in one clear line having written nothing.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from faulty_http import FaultyServer
from ilsvrc_fixture import DEVKIT, TRAIN_TAR, VAL_TAR, make_ilsvrc
from prefect.client.orchestration import get_client
from s3_server import moto_s3

import flows.download as fd
from flows.build_shards import build_shards
from flows.cli import main
from shards.fetch import RetryPolicy
from shards.interop import reader_files
from shards.manifest import read_manifest
from shards.storage import TMP_MARK

ROOT = Path(__file__).resolve().parents[1]
BUILD = {"dataset": "imagenet", "seed": 5, "shard_samples": 20, "workers": 1, "verify": "header"}
FAST = RetryPolicy(attempts=30, base_delay=0.01, max_delay=0.05, timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The fixture archives in a folder and their MD5s. Full-size photos: the train archive
    (3.6 MB) must outgrow fetch's 1 MiB write chunk for a cut body to leave bytes to resume from."""
    root = tmp_path_factory.mktemp("ilsvrc")
    expected = make_ilsvrc(root, classes=5, per_class=24, val_per_class=2, max_side=None)
    return root, expected["md5"]


@pytest.fixture(scope="module")
def clean(prefect_harness, served, tmp_path_factory):
    root, _ = served
    out = tmp_path_factory.mktemp("clean") / "imagenet"
    build_shards(source=str(root), output=str(out), **BUILD)
    return out, read_manifest(str(out))


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(fd, "POLICY", FAST)


def md5_args(md5: dict[str, str]) -> list[str]:
    return [a for name, digest in md5.items() for a in ("--md5", f"{name}={digest}")]


def local_digests(out: Path, manifest: dict) -> dict[str, tuple[str, int]]:
    names = [n for s in manifest["splits"].values() for sh in s["shards"] for n in (sh["name"], sh["index"])]
    return {n: (hashlib.sha256((out / n).read_bytes()).hexdigest(), (out / n).stat().st_size) for n in names}


def artifact_data(flow_run_id, key: str):
    body = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}, "key": {"any_": [key]}}, "limit": 10}
    found = get_client(sync_client=True).request("POST", "/artifacts/filter", json=body).json()
    assert len(found) == 1, f"expected one {key} artifact, found {len(found)}"
    return found[0]["data"]


def test_url_source_with_faults_to_s3_equals_clean_local_build(served, clean, fast_retries, tmp_path):
    root, md5 = served
    clean_out, clean_m = clean
    with moto_s3() as _, FaultyServer(root, drop_rate=1.0, error_rate=0.3, seed=11, max_drops=4) as srv:
        state = build_shards(
            source=f"{srv.url}/",
            output="s3://team-data/imagenet",
            cache_dir=str(tmp_path / "cache"),
            md5=md5,
            return_state=True,
            **BUILD,
        )
        result = state.result()
        fs = fsspec.filesystem("s3")
        names = {p.rsplit("/", 1)[-1] for p in fs.ls("team-data/imagenet", detail=False, refresh=True)}
        remote = {n: (hashlib.sha256(b := fs.cat(f"team-data/imagenet/{n}")).hexdigest(), len(b)) for n in names}
        m = read_manifest("s3://team-data/imagenet")
    assert result["output"] == "s3://team-data/imagenet"
    # The faults happened, and were survived by resuming (Range), not by starting over.
    statuses = [s for _, _, s in srv.requests]
    assert 503 in statuses and srv.drops_left == 0
    assert any(r and not r.startswith("bytes=0-") for _, r, _ in srv.requests)
    # Byte-identical shards and indexes, the same manifest entries, nothing else on S3.
    assert m["splits"] == clean_m["splits"] and m["classes"] == clean_m["classes"]
    want = local_digests(clean_out, clean_m)
    assert {n: remote[n] for n in want} == want
    assert names == set(want) | set(reader_files(m)) | {"manifest.json"}, names - set(want)
    assert not any(TMP_MARK in n for n in names)
    # The cache holds the three verified archives (with their MD5 sidecars) and no .part.
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert cached == sorted([DEVKIT, DEVKIT + ".md5", TRAIN_TAR, TRAIN_TAR + ".md5", VAL_TAR, VAL_TAR + ".md5"])
    assert artifact_data(state.state_details.flow_run_id, fd.DOWNLOAD_KEY) == 100.0


def test_verified_downloads_are_reused_by_the_next_run(served, clean, fast_retries, tmp_path):
    root, md5 = served
    cache = tmp_path / "cache"
    with FaultyServer(root) as srv:
        build_shards(source=srv.url, output=str(tmp_path / "a"), cache_dir=str(cache), md5=md5, **BUILD)
        n = len(srv.requests)
        build_shards(source=srv.url, output=str(tmp_path / "b"), cache_dir=str(cache), md5=md5, **BUILD)
    assert n == 3 and len(srv.requests) == n  # the second run asked the server for nothing
    assert local_digests(tmp_path / "b", clean[1]) == local_digests(clean[0], clean[1])


def test_wrong_md5_fails_in_one_line_and_writes_nothing(served, prefect_harness, fast_retries, tmp_path, capsys):
    root, md5 = served
    wrong = "0" * 32
    out = tmp_path / "out"
    with FaultyServer(root) as srv:
        argv = ["build-shards", "--dataset", "imagenet", "--source", srv.url, "--output", str(out)]
        argv += ["--cache-dir", str(tmp_path / "cache"), *md5_args(md5 | {VAL_TAR: wrong}), "--workers", "1"]
        with pytest.raises(SystemExit) as e:
            main(argv)
    assert e.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"error: build-shards failed: FetchError: {VAL_TAR}: MD5 {md5[VAL_TAR]} does not match the expected "
        f"{wrong} (after a fresh download)"
    ), last
    # Downloaded once, then once fresh, then no task-level retry: a checksum failure is final.
    assert [s for p, _, s in srv.requests if p.endswith(VAL_TAR)] == [200, 200]
    assert not out.exists()  # not even the folder
    assert not (tmp_path / "cache" / VAL_TAR).exists()


def test_kill_9_during_download_then_rerun_resumes(served, clean, prefect_harness, fast_retries, tmp_path):
    """The CLI in its own process, killed once the train archive's .part holds bytes; the rerun
    (in-process, same cache) asks only for the rest and builds the same bytes."""
    from prefect.settings import PREFECT_API_URL

    root, md5 = served
    cache, out = tmp_path / "cache", tmp_path / "out"
    part = cache / (TRAIN_TAR + ".part")
    size = (root / TRAIN_TAR).stat().st_size
    with FaultyServer(root, rate=max(size // 20, 1024)) as srv:  # about 20 s for the train archive
        env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        argv = [sys.executable, "-m", "flows", "build-shards", "--dataset", "imagenet", "--source", srv.url]
        argv += ["--output", str(out), "--cache-dir", str(cache), *md5_args(md5), "--workers", "1"]
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 45
            while not (part.exists() and part.stat().st_size > 0):
                assert proc.poll() is None, "the CLI ended before the download began"
                assert time.monotonic() < deadline, "no .part file appeared"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        kept = part.stat().st_size
        assert 0 < kept < size and not (cache / TRAIN_TAR).exists()
        srv.rate = None  # the rerun goes at full speed
        build_shards(source=srv.url, output=str(out), cache_dir=str(cache), md5=md5, **BUILD)
    assert any(p.endswith(TRAIN_TAR) and r and int(r[6:].split("-")[0]) > 0 for p, r, _ in srv.requests)
    assert not part.exists()
    assert local_digests(out, clean[1]) == local_digests(clean[0], clean[1])
    assert not any(TMP_MARK in p.name for p in out.iterdir())
