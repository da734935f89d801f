"""The progress artifact never goes backwards, however the task threads interleave.

The flaky `progress 83.3, not 100` came from updates sent outside ProgressArtifact's lock: two
threads' updates in flight at once reach the server in either order. The fake server here
records the order updates arrive in and whether each was sent under the lock, so the race
shows deterministically, not by luck of scheduling.
"""

from __future__ import annotations

import threading

import flows.build_shards as fb


def test_progress_updates_arrive_in_order_and_end_at_100(monkeypatch):
    sent: list[float] = []
    unlocked: list[float] = []
    progress = fb.ProgressArtifact(total=64, artifact_id="artifact")

    def fake_update(artifact_id, value, description):
        if not progress._lock.locked():
            unlocked.append(value)  # another thread's newer update could overtake this one
        threading.Event().wait(0.001)  # a server round trip: lets another thread run meanwhile
        sent.append(value)

    monkeypatch.setattr(fb, "update_progress_artifact", fake_update)
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        start.wait()
        for i in range(8):
            progress.shards_done([f"shard-{t}-{i}"])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not unlocked, f"{len(unlocked)} progress updates were sent outside the lock"
    assert sent == sorted(sent) and sent[-1] == 100.0
    assert len(sent) == 64


def test_a_retried_shard_is_not_counted_twice(monkeypatch):
    sent: list[float] = []
    monkeypatch.setattr(fb, "update_progress_artifact", lambda a, value, description: sent.append(value))
    progress = fb.ProgressArtifact(total=2, artifact_id="artifact")
    progress.shards_done(["a"])
    progress.shards_done(["a"])
    progress.shards_done(["b"])
    assert sent == [50.0, 50.0, 100.0]
