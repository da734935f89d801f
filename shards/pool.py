"""The process pool that does the CPU work of writing shards (decode, verify, re-encode, hash).

Python threads cannot decode images in parallel, so shards go to `workers` spawned processes:
build() submits them all, the flow's tasks (threads) hand over one at a time. The source is
sent to each process once, when it starts, rather than pickled with every shard; a process
holds one shard at a time, so memory stays bounded whatever the dataset size. A process whose
parent dies exits, and a pool that lost a process is replaced, so a retry can succeed.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool

from shards.plan import ShardSpec
from shards.storage import Storage
from shards.types import Options, Source
from shards.write import ShardRecord, write_shard

_source: Source | None = None  # set in each pool process by _init
PARENT_CHECK_SECONDS = 0.5


def _init(source: Source, parent: int) -> None:
    global _source
    _source = source
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A pool process whose parent was killed (kill -9 of the CLI) exits instead of living on."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


def _write(spec: ShardSpec, storage: Storage, options: Options, params: dict) -> ShardRecord:
    assert _source is not None, "pool process not initialised"
    return write_shard(_source, spec, storage, options, params)


class ShardPool:
    """`workers` spawned processes writing one shard each at a time."""

    def __init__(self, source: Source, workers: int) -> None:
        self.source, self.workers = source, workers
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> cf.ProcessPoolExecutor:
        ctx = mp.get_context("spawn")
        return cf.ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_init, initargs=(self.source, os.getpid())
        )

    def submit(self, spec: ShardSpec, storage: Storage, options: Options, params: dict) -> cf.Future[ShardRecord]:
        """Start writing one shard in a pool process; the future holds its record."""
        return self._pool.submit(_write, spec, storage, options, params)

    def write(self, spec: ShardSpec, storage: Storage, options: Options, params: dict) -> ShardRecord:
        """Write one shard in a pool process and wait for its record (called from task threads)."""
        pool = self._pool
        try:
            return pool.submit(_write, spec, storage, options, params).result()
        except BrokenProcessPool:
            # A process died (killed, out of memory): start a fresh pool so the task's retry can
            # succeed, then fail this attempt. Written shards are reused by the retry.
            with self._lock:
                if self._pool is pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._start()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
