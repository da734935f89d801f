"""The reader's side of the shard cache: ShardCache (one shard occurrence at a time) and EpochReads
(one epoch's batches), over the node plan, the shared folder and the downloader."""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from loaders.cache import indexes
from loaders.cache.download import Downloader, Local, Remote, locate
from loaders.cache.errors import CacheError, Closed, DiskFull
from loaders.cache.folder import WANTED, CacheFolder, Flock
from loaders.cache.plan import NodePlan, Run, smallest_limit
from loaders.sharding import EpochPlan
from shards.cache_root import cache_root
from shards.redact import redact_url
from shards.sizes import parse_size

log = logging.getLogger("loaders.cache")

# The default limit: this share of the space the cache folder's file system has free (plus what
# the cache already holds), so training never fills the disk it shares with checkpoints and logs.
DEFAULT_FREE_SHARE = 0.8
IN_FLIGHT = 2  # prefetch downloads at once per process (the node's budget bounds them by bytes)
# How far a rank prefetches ahead of its reader: the bytes of this many of the largest shards still
# to fetch (hits in between do not count). Deeper prefetch evicts too early: a shard kept for later
# (the next epoch) goes for one needed soon, where waiting would have let a shard read meanwhile go.
AHEAD_SHARDS = 2
POLL_S = 0.05  # how often a waiter looks at another process's lock or at freed space
TIMEOUTS = (TimeoutError, concurrent.futures.TimeoutError)  # distinct classes before Python 3.11


def default_folder(root_url: str) -> str:
    """<cache root>/shards/<hash of the set's redacted root URL>: credentials in a URL never
    shape a path, and the same set read with other credentials shares one cache."""
    digest = hashlib.sha256(redact_url(root_url.rstrip("/")).encode()).hexdigest()[:16]
    return str(cache_root() / "shards" / digest)


def default_limit(folder: str, held: int) -> int:
    """DEFAULT_FREE_SHARE of (free space + what the cache already holds) on the folder's disk."""
    return max(1, int(DEFAULT_FREE_SHARE * (shutil.disk_usage(folder).free + held)))


def _held(folder: str) -> int:
    with os.scandir(folder) as it:
        return sum(e.stat().st_size for e in it if e.is_file(follow_symlinks=False) and not e.name.startswith("."))


@dataclass
class CacheStats:
    bytes_downloaded: int = 0  # bytes this process received from the store (indexes included)
    bytes_served: int = 0  # bytes of the shards handed to the reader, hits and misses
    hits: int = 0  # shard reads that found their shard already here
    misses: int = 0  # shards this process downloaded (ahead of the reader or while it waited)
    peak_bytes: int = 0  # most the folder held (files + every process's downloads), as this process saw it
    evicted: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class ShardCache:
    """Local copies of `tars` (and their `indexes`) in `folder`, shared by the node's processes:
    at most `limit` bytes, plus at most EXCESS_SHARDS of the largest shards a reader waits for.

    `local_ranks`: how many ranks of this node read through this folder (sizes the smallest
    limit that works); `announce(NodePlan)` before `start_epoch` gives their plans."""

    def __init__(
        self,
        tars: list[Remote],
        indexes: list[Remote],
        folder: str,
        limit: int | str | None = None,
        *,
        in_flight: int = IN_FLIGHT,
        verbose: bool = False,
        local_ranks: int = 1,
        part_bytes: int | None = None,
    ) -> None:
        self.folder = os.path.abspath(folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise CacheError(f"shard cache {self.folder}: cannot create it: {e}") from None
        self.limit = (
            parse_size(limit, "cache_limit") if limit is not None else default_limit(self.folder, _held(self.folder))
        )
        self.in_flight, self.verbose, self.local_ranks = max(0, in_flight), verbose, local_ranks
        self._closed = False
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)  # the reader moved, a job ended, closing
        self._progress: dict[str, tuple[int, int]] = {}  # local name -> (bytes so far, total) of downloads
        self._stats = CacheStats()
        with ThreadPoolExecutor(8, thread_name_prefix="shard-cache-head") as pool:
            self.tars: list[Local] = list(pool.map(locate, tars))
            self._index_files: list[Local] = list(pool.map(locate, indexes))
        self._check_limit()
        keep = {f.name for f in self._index_files}
        largest = max((t.size for t in self.tars), default=0)
        self.store = CacheFolder(self.folder, self.limit, largest, keep=keep.__contains__)
        self.store.next_use = self._next_use_of
        kw = {"part_bytes": part_bytes} if part_bytes else {}
        self.dl = Downloader(self.store, lambda: self._closed, self._on_bytes, threads=4 * (self.in_flight + 2), **kw)
        self._by_name = {t.name: s for s, t in enumerate(self.tars)}
        self._node, self._announced = NodePlan.single([]), None
        self._runs: list[Run] = []
        self._demand = 0  # occurrences [0, _demand) were asked for by the reader
        self._now = 0  # the reader's batch on the node plan's clock
        self._held: dict[int, int] = {}  # occurrence -> shard, pinned by get() until release()
        self._pins: dict[int, tuple[int, Flock]] = {}  # shard -> (holds, its shared pin lock)
        self._wanted: set[str] = set()  # local names get() waits for in this process
        self._jobs: dict[int, Future] = {}  # shard -> its latest fetch in this process
        self._horizon = -1.0  # batches ahead the prefetch window reaches: trim() keeps what it fetched
        self._pool = ThreadPoolExecutor(self.in_flight + 2, thread_name_prefix="shard-cache")
        self._prefetcher = threading.Thread(target=self._prefetch_loop, name="shard-cache-prefetch", daemon=True)
        if self.in_flight:  # 0: only what the reader asks for (tests that need one order of events)
            self._prefetcher.start()

    def _check_limit(self) -> None:
        """A limit in which the node's readers cannot each hold a shard is refused, naming the least that works."""
        largest = max((t.size for t in self.tars), default=0)
        least = smallest_limit(largest, self.local_ranks, sum(f.size for f in self._index_files))
        if self.limit < least:
            raise CacheError(
                f"cache_limit {self.limit / 1e6:.1f} MB is too small for {self.folder}: use at least "
                f"{least / 1e6:.1f} MB ({self.local_ranks} local rank(s) x the largest shard, "
                f"{largest / 1e6:.1f} MB, plus the indexes)"
            )

    @property
    def stats(self) -> CacheStats:
        self._stats.peak_bytes, self._stats.evicted = self.store.peak, self.store.evicted
        return self._stats

    # -- the reader's side ----------------------------------------------------------------------
    def fetch_indexes(self) -> list[str]:
        """Local paths of every shard's .idx, downloaded once per node (small; kept while the set is
        used) and checked (loaders/cache/indexes.py)."""
        with ThreadPoolExecutor(8, thread_name_prefix="shard-cache-idx") as pool:
            paths = list(pool.map(lambda f: self._ensure(f, None), self._index_files))
        for path, idx, tar in zip(paths, self._index_files, self.tars, strict=False):
            with open(path) as f:
                indexes.check_shape(f.read(), tar.size, idx.remote.shown)
        return paths

    def local_path(self, shard: int) -> str:
        """Where shard number `shard` lives once it is cached (what get() returns)."""
        return os.path.join(self.folder, self.tars[shard].name)

    def announce(self, node: NodePlan) -> None:
        """Every local rank's runs for the coming reading (this epoch from its batch, and the next);
        start_epoch() takes it when its own runs are the sequence asked for."""
        self._announced = node

    def start_epoch(self, sequence: list[int]) -> None:
        """This epoch's shard occurrences in the reader's order; prefetching starts at once."""
        self.end_epoch()
        node, self._announced = self._announced, None
        if node is None or node.sequence != list(sequence):
            node = NodePlan.single(list(sequence))
        with self._mutex:
            self._node, self._runs, self._demand, self._now = node, node.own, 0, 0
            self._changed.notify_all()

    def get(self, j: int) -> str:
        """Local path of occurrence j's shard, pinned until release(j); waits for its download."""
        with self._mutex:
            if self._closed or j >= len(self._runs):
                raise CacheError(f"shard cache {self.folder}: occurrence {j} asked for outside its epoch")
            run = self._runs[j]
            self._demand, self._now = max(self._demand, j + 1), max(self._now, run.first)
            self._changed.notify_all()
        shard, local = run.shard, self.tars[run.shard]
        self._pin(j, shard)
        path = self.local_path(shard)
        if self._present(local):
            self._served(local, hit=True)
            return path
        with self._mutex:
            self._wanted.add(local.name)
        try:
            with self.store.marked(WANTED, local.name):
                for _ in range(3):
                    with self._mutex:  # a prefetch in flight is waited for; a failed one reports its error
                        job = self._jobs.get(shard)
                        if job is None or (job.done() and job.exception() is None):
                            job = self._jobs[shard] = self._pool.submit(self._ensure, local, shard)
                    self._wait(job, local)
                    if self._present(local):  # pinned: it stays until release(j)
                        self._served(local, hit=False)
                        return path
        finally:
            with self._mutex:
                self._wanted.discard(local.name)
        raise CacheError(f"{local.remote.shown}: cannot keep it in {self.folder}")

    def release(self, j: int) -> None:
        with self._mutex:
            shard = self._held.pop(j, None)
            if shard is not None:
                self._unpin(shard)
            self._changed.notify_all()
        if shard is not None and not self._closed:
            self.store.trim(self._horizon)

    def end_epoch(self) -> None:
        """Drop every pin the epoch still holds (at its end, or when the reader stopped early); the
        prefetch goes on with the next epoch's first shards."""
        with self._mutex:
            for shard in self._held.values():
                self._unpin(shard)
            self._held.clear()
            self._demand = len(self._runs)
            self._now = self._runs[-1].last + 1 if self._runs else self._now
            self._changed.notify_all()
        if not self._closed:
            self.store.trim(self._horizon)

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self.end_epoch()
        if self._prefetcher.is_alive():
            self._prefetcher.join(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.dl.shutdown()
        with contextlib.suppress(OSError):
            self.store.trim()  # what the prefetch brought for an epoch that will not come: under the limit
        self.store.close()

    # -- pins (under self._mutex) -------------------------------------------------------------------
    def _pin(self, j: int, shard: int) -> None:
        with self._mutex:
            if j in self._held:
                return
            self._held[j] = shard
            holds, pin = self._pins.get(shard, (0, None))
            if pin is None:  # an evictor holds it exclusively only while it unlinks
                pin = Flock(self.store.pin_path(self.tars[shard].name)).lock(fcntl.LOCK_SH)
            self._pins[shard] = (holds + 1, pin)

    def _unpin(self, shard: int) -> None:
        holds, pin = self._pins.pop(shard)
        if holds > 1:
            self._pins[shard] = (holds - 1, pin)
        else:
            pin.close()

    # -- the plan, as eviction sees it -----------------------------------------------------------
    def _next_use_of(self, name: str) -> float:
        """Batches until a local rank reads the file `name` (an old version or a stranger: never)."""
        shard = self._by_name.get(name)
        return self._node.next_use(shard, self._now) if shard is not None else float("inf")

    # -- prefetch -----------------------------------------------------------------------------------
    def _ahead(self) -> list[Run]:
        with self._mutex:
            return self._runs[self._demand :] + self._node.own_next

    def _prefetch_loop(self) -> None:
        """Fetch this rank's next shards in order of first need, this epoch then the next, while they
        fit (after evicting only what is needed later) and within this rank's share of the budget."""
        while not self._closed:
            with contextlib.suppress(Closed):
                self._prefetch_round()
            with self._mutex:
                if not self._closed:
                    self._changed.wait(timeout=0.2)

    def _prefetch_round(self) -> None:
        largest = max((t.size for t in self.tars), default=0)
        share = min(self.limit // max(1, self.local_ranks), AHEAD_SHARDS * largest)
        ahead, seen = 0, set()
        self._horizon = -1.0
        for run in self._ahead():
            s = run.shard
            if s in seen:
                continue
            seen.add(s)
            if self._present(self.tars[s]):
                continue  # a hit: the window counts only bytes to fetch, so the wire never idles over hits
            ahead += self.tars[s].size
            if ahead > share and ahead > self.tars[s].size:
                return
            self._horizon = max(self._horizon, self._node.next_use(s, self._now))
            with self._mutex:
                job = self._jobs.get(s)
                busy = sum(1 for f in self._jobs.values() if not f.done())
            if job is not None and (not job.done() or job.exception() is not None):
                continue  # in flight here, or failed (get() reports it)
            if busy >= self.in_flight:
                return
            with self._mutex:  # get() sees either no prefetch of s or this one, never a window between
                if self.tars[s].name in self._wanted or self._closed:
                    continue  # get() fetches it itself
                lock = self._reserve_ahead(s)
                if lock is None:
                    return  # no room for it: none for what is needed later either
                if lock is False:
                    continue  # another process downloads it
                self._jobs[s] = self._pool.submit(self._transfer, self.tars[s], s, *lock)

    def _reserve_ahead(self, s: int):
        """(download lock, reservation) for a prefetch of shard s; False: another process has it; None: no room."""
        local = self.tars[s]
        lock = self.store.download_lock(local.name)
        if not lock.try_lock(fcntl.LOCK_EX):
            lock.close()
            return False
        if self._present(local):
            lock.close()
            return False
        res = self.store.reserve(local.name, local.size, self._node.next_use(s, self._now), awaited=False)
        if res is None:
            lock.close()
            return None
        return lock, res

    # -- one file -----------------------------------------------------------------------------------
    def _awaited(self, local: Local) -> Callable[[], bool]:
        return lambda: local.name in self._wanted or self.store.wanted(local.name)

    def _ensure(self, local: Local, shard: int | None) -> str:
        """The local path of a file, downloaded under its lock when it is not here; a reader waits for it."""
        final = os.path.join(self.folder, local.name)
        if self._present(local):
            return final
        lock = self.store.download_lock(local.name)
        try:
            while not lock.try_lock(fcntl.LOCK_EX):  # another process downloads it: wait, then use its copy
                if self._present(local):
                    return final
                self._check_open()
                time.sleep(POLL_S)
            if self._present(local):
                return final
            next_use = self._node.next_use(shard, self._now) if shard is not None else -1.0
            while (res := self.store.reserve(local.name, local.size, next_use, awaited=True)) is None:
                self._check_open()
                with self._mutex:
                    self._changed.wait(timeout=0.1)  # a release here; another process's shows on the next look
            self._transfer(local, shard, None, res)
            return final
        finally:
            lock.close()

    def _transfer(self, local: Local, shard: int | None, lock: Flock | None, res) -> None:
        """Download into the reservation (under the download lock); a tar's index is checked against it."""
        final = os.path.join(self.folder, local.name)
        check = None
        if shard is not None and shard < len(self._index_files):
            idx = self._index_files[shard]
            index_path = os.path.join(self.folder, idx.name)
            check = lambda part: indexes.check_against_tar(index_path, part, idx.remote.shown)  # noqa: E731
        try:
            try:
                self.dl.download(local, final, res, self._awaited(local), check)
            except DiskFull:
                self.store.cancel(res)
                if lock is not None:
                    return  # a prefetch: the disk may have room again when the reader asks for it
                raise
            except BaseException:
                self.store.cancel(res)
                raise
            finally:
                with self._mutex:
                    self._progress.pop(local.name, None)
            if shard is not None:
                with self._mutex:
                    self._stats.misses += 1
        finally:
            if lock is not None:
                lock.close()
            with self._mutex:
                self._changed.notify_all()

    def _present(self, local: Local) -> bool:
        try:
            return os.stat(os.path.join(self.folder, local.name)).st_size == local.size
        except FileNotFoundError:
            return False

    def _check_open(self) -> None:
        if self._closed:
            raise Closed()

    def _served(self, local: Local, hit: bool) -> None:
        with self._mutex:
            self._stats.bytes_served += local.size
            if hit:
                self._stats.hits += 1

    def _on_bytes(self, name: str, done: int, total: int) -> None:
        with self._mutex:
            before = self._progress.get(name, (0, total))[0]
            self._stats.bytes_downloaded += max(0, done - before)
            self._progress[name] = (done, total)

    # -- waiting ------------------------------------------------------------------------------------
    def _wait(self, job: Future, local: Local) -> None:
        start, reported, got0 = time.monotonic(), None, self._stats.bytes_downloaded
        while True:
            try:
                job.result(timeout=1.0)
                return
            except TIMEOUTS:
                now = time.monotonic()
                if self.verbose and (reported is None or now - reported >= 5.0):
                    reported = now
                    self._report_wait(local, now - start, self._stats.bytes_downloaded - got0)
            except Closed:
                raise CacheError(f"shard cache {self.folder}: closed while {local.remote.stem} downloaded") from None

    def _report_wait(self, local: Local, waited: float, got: int) -> None:
        """One line while the reader waits (the first shards of a run): MB/s and ETA of what is in flight."""
        with self._mutex:
            progress = list(self._progress.values())
        done, total = sum(d for d, _ in progress), sum(t for _, t in progress)
        if not progress:
            what = "another process's download of it, or room in the cache"
        else:
            rate = got / max(waited, 1e-3) / 1e6
            eta = f"{(total - done) / 1e6 / rate:.0f} s" if rate > 0 else "?"
            what = f"{done / 1e6:.0f} of {total / 1e6:.0f} MB of {len(progress)} shards in flight, {rate:.1f} MB/s, ETA {eta}"
        print(f"shard cache: waiting for {local.remote.stem} ({what}; into {self.folder})", file=sys.stderr, flush=True)


class EpochReads:
    """One epoch's plan as the cache serves it: the shards to have before a batch, and the ones
    the reader is done with after it. Each run of same-shard rows is one cache occurrence."""

    def __init__(self, cache: ShardCache, plan: EpochPlan) -> None:
        self.cache, self.batch_size = cache, plan.batch_size
        self._lock = threading.Lock()  # need() may run in a thread that prepares the next pipeline
        self.run_shard, run_start = plan.runs()
        run_stop = np.append(run_start[1:], len(plan.shard))
        self.first_batch = run_start // plan.batch_size
        self.last_batch = (run_stop - 1) // plan.batch_size
        self._got = 0  # runs [0, _got) were asked for
        self._done = 0  # runs [0, _done) were released
        self.paths: dict[int, str] = {}  # shard -> local path, for the runs held
        cache.start_epoch(self.run_shard.tolist())

    def need(self, batch: int) -> dict[int, str]:
        """Block until every run that starts by `batch` is local; shard -> local path of the held ones."""
        while True:
            with self._lock:
                j = self._got
                if j >= len(self.run_shard) or self.first_batch[j] > batch:
                    return dict(self.paths)
            path = self.cache.get(j)  # not under the lock: finished() must not wait for a download
            with self._lock:
                self.paths[int(self.run_shard[j])] = path
                self._got = j + 1

    def finished(self, batch: int) -> None:
        """Batches up to `batch` reached the consumer: release the runs that end by then."""
        with self._lock:
            while self._done < self._got and self.last_batch[self._done] <= batch:
                self.cache.release(self._done)
                self._done += 1

    def close(self) -> None:
        self.cache.end_epoch()
