"""The output lock (shards/lock.py): one build per output, locally (flock) and on S3 (a lease).

Racing builds, a build killed while it holds the lock, --wait, and an object-store lease that
expires or is taken over, on a real moto S3 endpoint over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import PhotoSource
from s3_server import moto_s3

import shards.lock as lk
from shards.build import BuildError, build
from shards.lock import LOCK_NAME, LockHeld, LockLost, OutputLock, output_lock
from shards.manifest import read_manifest
from shards.storage import Storage
from shards.types import Options
from shards.verify import verify

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_build_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with output_lock(str(out), {"seed": 7}):
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["params"] == {"seed": 7}
        with pytest.raises(LockHeld) as e:
            build(PhotoSource(copies=1), str(out), Options(seed=8, shard_samples=7), workers=1)
        message = str(e.value)
        assert "\n" not in message and f"pid {os.getpid()}" in message and holder["started"] in message
        assert "wait, or choose another --output" in message
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the second build wrote nothing
    assert not out.exists()  # released: the lock file goes, and the folder the lock made too


def test_a_holder_still_writing_its_record_still_holds_the_lock(tmp_path):
    """The race the racing-builds test once hit: the second build read the lock file in the
    moment the first had emptied it to write its record, and took that for a free lock."""
    out = tmp_path / "out"
    with output_lock(str(out)):
        (out / LOCK_NAME).write_text("")  # what a reader sees between the holder's truncate and write
        with pytest.raises(LockHeld, match="locked by another build: wait, or choose another --output"):
            OutputLock(Storage(out)).acquire()


def test_racing_builds_leave_one_complete_verified_set(tmp_path):
    """Two builds with different seeds into one output at once, as when a deployment is triggered twice."""
    out, outcomes, start = tmp_path / "race", {}, threading.Barrier(2)

    def one(seed: int) -> None:
        start.wait()
        try:
            outcomes[seed] = build(PhotoSource(copies=1), str(out), Options(seed=seed, shard_samples=5), workers=1)
        except (LockHeld, BuildError) as e:  # held now, or already finished with the other seed
            outcomes[seed] = e

    threads = [threading.Thread(target=one, args=(s,)) for s in (7, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    won = [s for s, r in outcomes.items() if isinstance(r, dict)]
    assert len(won) == 1, outcomes
    assert read_manifest(str(out))["params"]["seed"] == won[0]
    checks = verify(str(out), decode=True)
    assert checks and all(not c.problems for c in checks)
    assert not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_build_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, shards.lock as l; l.OutputLock(l.Storage({str(out)!r})).acquire(); "
         "print('held', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {holder.pid} "):
            OutputLock(Storage(out)).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdin.close()
        holder.stdout.close()
    with output_lock(str(out)) as lock:  # the kernel dropped the dead build's flock
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.check()


def test_wait_waits_for_the_holder_to_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(lk, "POLL_SECONDS", 0.02)
    out, first = tmp_path / "out", OutputLock(Storage(tmp_path / "out"))
    first.acquire()
    told: list[str] = []

    def waiting(message: str) -> None:  # the second build says why it waits; then the first ends
        told.append(message)
        first.release()

    with output_lock(str(out), wait=True, on_wait=waiting):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(told) == 1 and told[0].startswith("waiting: ") and "locked by build pid" in told[0]


@pytest.fixture(scope="module")
def s3():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an instance cached by another test points elsewhere
    with moto_s3() as endpoint:
        yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()  # and ours must not outlive this endpoint


def test_s3_lease_is_exclusive_and_released(s3):
    storage = Storage("s3://team-data/leased")
    with output_lock(storage, {"seed": 1}):
        assert storage.exists(LOCK_NAME)
        with pytest.raises(LockHeld, match=r"locked by build pid \d+ on .* since .*: wait, or choose another"):
            OutputLock(Storage("s3://team-data/leased")).acquire()
    assert not storage.exists(LOCK_NAME)
    with output_lock(storage):  # free again
        pass


def test_s3_expired_lease_is_taken_over_and_the_old_holder_cannot_publish(s3):
    storage = Storage("s3://team-data/expired")
    dead = OutputLock(storage, ttl=0.0)._impl  # a build whose lease expired at once: killed, or cut off
    dead.etag = dead._put(IfNoneMatch="*")  # it created the lease, then never renewed it
    with output_lock(Storage("s3://team-data/expired")) as lock:
        lock.check()
        # The old holder wakes up and renews: its If-Match fails, so it knows it lost the output.
        dead.renew_once()
        with pytest.raises(LockLost):
            dead.check()
        dead.release()  # and it never deletes the lease it lost
        assert storage.exists(LOCK_NAME)
        lock.check()
    assert not storage.exists(LOCK_NAME)


def test_s3_lease_is_renewed_while_held(s3):
    storage = Storage("s3://team-data/renewed")
    with output_lock(storage, ttl=0.3) as lock:
        first = lock._impl.etag
        changed = threading.Event()
        for _ in range(600):  # the renewer runs every ttl/3; wait up to 30 s for one renewal
            if lock._impl.etag != first:
                changed.set()
                break
            threading.Event().wait(0.05)
        assert changed.is_set()
        lock.check()
        holder = json.loads(storage.read_bytes(LOCK_NAME))
        assert holder["started"] == lock._impl.record["started"] and holder["renewed"] > 0  # since when: the start
