"""shards.fetch against a real loopback HTTP server that drops connections and answers 503."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faulty_http import FaultyServer

from shards.fetch import FetchError, RetryPolicy, fetch

FAST = RetryPolicy(attempts=30, base_delay=0.01, max_delay=0.05, timeout=10)


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    data = os.urandom(3 << 20)
    (root / "a.tar").write_bytes(data)
    return root, data, hashlib.md5(data).hexdigest()


def test_download_survives_drops_and_503s_by_resuming(archive, tmp_path):
    root, data, md5 = archive
    with FaultyServer(root, drop_rate=1.0, error_rate=0.3, seed=3, max_drops=4) as srv:
        path = fetch(f"{srv.url}/a.tar", str(tmp_path / "cache"), md5=md5, policy=FAST)
    assert Path(path).read_bytes() == data
    statuses = [s for _, _, s in srv.requests]
    assert 503 in statuses
    assert srv.drops_left == 0  # every planned drop happened
    # Resumed with Range rather than restarting: some request asked for a later offset.
    assert any(r and not r.startswith("bytes=0-") for _, r, _ in srv.requests)
    assert not os.path.exists(path + ".part")


def test_verified_download_is_reused_without_a_request(archive, tmp_path):
    root, _, md5 = archive
    with FaultyServer(root) as srv:
        fetch(f"{srv.url}/a.tar", str(tmp_path / "cache"), md5=md5, policy=FAST)
        n = len(srv.requests)
        fetch(f"{srv.url}/a.tar", str(tmp_path / "cache"), md5=md5, policy=FAST)
    assert len(srv.requests) == n


def test_4xx_fails_at_once_with_a_clear_error(archive, tmp_path):
    root, _, _ = archive
    with FaultyServer(root) as srv, pytest.raises(FetchError, match="HTTP 404"):
        fetch(f"{srv.url}/missing.tar", str(tmp_path / "cache"), policy=FAST)
    assert len(srv.requests) == 1


def test_md5_mismatch_downloads_once_more_then_names_both_digests(archive, tmp_path):
    root, _, md5 = archive
    wrong = "0" * 32
    with FaultyServer(root) as srv, pytest.raises(FetchError) as e:
        fetch(f"{srv.url}/a.tar", str(tmp_path / "cache"), md5=wrong, policy=FAST)
    assert md5 in str(e.value) and wrong in str(e.value) and "a.tar" in str(e.value)
    assert sum(1 for _, r, _ in srv.requests if r is None) == 2  # one fresh download
    assert os.listdir(tmp_path / "cache") == []  # nothing half-verified left behind


def test_retries_are_bounded(archive, tmp_path):
    root, _, _ = archive
    with FaultyServer(root, error_rate=1.0) as srv, pytest.raises(FetchError, match="giving up after 3 attempts"):
        fetch(f"{srv.url}/a.tar", str(tmp_path / "cache"), policy=RetryPolicy(3, 0.01, 0.02, 5))


def test_local_path_is_checked_not_copied(archive, tmp_path):
    root, _, md5 = archive
    assert fetch(str(root / "a.tar"), str(tmp_path / "cache"), md5=md5) == str(root / "a.tar")
    with pytest.raises(FetchError, match="does not match"):
        fetch(str(root / "a.tar"), str(tmp_path / "cache"), md5="1" * 32)


def test_kill_9_during_download_then_rerun_resumes_from_the_part(archive, tmp_path):
    root, data, md5 = archive
    cache = tmp_path / "cache"
    part = cache / "a.tar.part"
    with FaultyServer(root, rate=512 << 10) as slow:
        code = f"from shards.fetch import fetch; fetch({slow.url + '/a.tar'!r}, {str(cache)!r}, md5={md5!r})"
        proc = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size > 256 << 10):
            assert time.monotonic() < deadline and proc.poll() is None, "download never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    have = part.stat().st_size
    assert 0 < have < len(data) and not (cache / "a.tar").exists()
    with FaultyServer(root) as srv:
        path = fetch(f"{srv.url}/a.tar", str(cache), md5=md5, policy=FAST)
    assert Path(path).read_bytes() == data
    assert srv.requests[0][1] == f"bytes={have}-"  # asked only for the rest
