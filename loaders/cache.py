"""A bounded, machine-wide local cache of remote shards, filled ahead of the reader in plan order.

Why: a backend that seeks through a remote tar per sample re-fetches large blocks at each jump
(the pytorch backend) or pays one request per sample (DALI). The epoch plan
(loaders/sharding.py) already says which shards this rank reads in which order, so whole
shards are downloaded ahead of use into a local folder, and both backends read only local
files from it: no per-sample request reaches the network.

How, one shard occurrence at a time (`start_epoch(sequence)`, `get(j)`, `release(j)`):

- Ahead: up to `in_flight` occurrences past the reader are claimed and downloaded on a thread
  pool; a shard over PART_BYTES comes as parallel ranged GETs, hashed in order as they arrive
  (sha256, compared with the manifest's), written into a preallocated `.part-*` file, and
  renamed to its final name only when size and digest match. A mismatch downloads once more,
  then fails naming the URL. Final names carry the content's digest (`<stem>.<sha16>.tar`), so a
  rebuilt set never reads an old file, and the old version is deleted when the new one lands.
- Bounded: before a download the cache makes room under `limit` (all files in the folder, every
  process's, `.part` files at full size). It never evicts a pinned shard. It evicts what this
  reader has finished with for the epoch first, then the one needed furthest ahead (Belady).
  A prefetch waits while nothing can go; the shard the reader waits for goes ahead anyway, so
  disk use stays under the limit plus the shards in flight.
- Shared: every process on the machine uses the same folder. A shard being read is pinned by a
  shared flock on `.locks/<file>.pin` (eviction takes it exclusively, without blocking); a
  download holds an exclusive flock on `.locks/<file>.lock`, so each shard crosses the wire once
  per machine while the others wait for it. The kernel drops a killed process's flocks, so the
  next process takes the lock over and deletes the half-written `.part`.

Retries: connection errors, timeouts, 5xx and throttling are retried with backoff and jitter
(shards/retry.py, on top of botocore's own); 403 and 404 fail at once naming the URL.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from loaders.sharding import EpochPlan
from shards.cache_root import cache_root
from shards.retry import RetryPolicy, retry_call
from shards.storage import Storage

log = logging.getLogger("loaders.cache")

# The default limit: this share of the space the cache folder's file system has free (plus what
# the cache already holds), so training never fills the disk it shares with checkpoints and logs.
DEFAULT_FREE_SHARE = 0.8
IN_FLIGHT = 3  # shards downloaded at once, ahead of the reader
PART_BYTES = 8 << 20  # ranged GET size; a shard larger than this is fetched in parallel parts
RANGES_PER_SHARD = 4  # parallel ranged GETs per shard (memory: PART_BYTES each)
POLL_S = 0.05  # how often a waiter looks at another process's lock or at freed space
POLICY = RetryPolicy(attempts=6, base_delay=0.5, max_delay=20.0)
LOCKS = ".locks"
PART = ".part-"
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


class CacheError(RuntimeError):
    """The cache cannot provide a shard; the message is one line naming the URL or the folder."""


class _Closed(Exception):
    pass


def parse_size(value: int | str) -> int:
    """Bytes from 1000000, "200GB", "1.5TB", "500MiB" (decimal units; KiB/MiB/GiB/TiB binary)."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"cache limit must be positive, not {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(value), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"cache limit {value!r}: use bytes or a size such as 200GB, 1.5TB, 500MiB")
    unit = m.group(2).upper()
    scale = 1024 ** ("KMGT".index(unit) + 1) if m.group(3) else _UNITS[unit]
    return int(float(m.group(1)) * scale)


def default_folder(root_url: str) -> str:
    """<cache root>/shards/<hash of the set's root URL>; the root is $SHARDLINE_CACHE_DIR, else ~/.cache/shardline."""
    digest = hashlib.sha256(root_url.rstrip("/").encode()).hexdigest()[:16]
    return str(cache_root() / "shards" / digest)


def default_limit(folder: str, held: int) -> int:
    """DEFAULT_FREE_SHARE of (free space + what the cache already holds) on the folder's disk."""
    return max(1, int(DEFAULT_FREE_SHARE * (shutil.disk_usage(folder).free + held)))


@dataclass(frozen=True)
class Remote:
    """One remote file; its verified bytes take the local name `<tag>.<file name>`."""

    url: str
    size: int | None  # None: asked from the store (no manifest beside the shards)
    sha256: str | None

    @property
    def stem(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class _Local:
    """Where a remote file lives here: `<tag>.<file name>`, the tag being the head of its sha256
    (or of its ETag where no manifest gives one), so a rebuilt set never reads an old file."""

    remote: Remote
    tag: str
    size: int

    @property
    def name(self) -> str:
        return f"{self.tag}.{self.remote.stem}"


@dataclass
class CacheStats:
    bytes_downloaded: int = 0  # bytes this process received from the store (indexes included)
    bytes_served: int = 0  # bytes of the shards handed to the reader, hits and misses
    hits: int = 0  # shard reads served from files already in the cache
    misses: int = 0  # shard reads this process downloaded
    peak_bytes: int = 0  # most the folder held, as this process saw it at each download
    evicted: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


def _permanent(e: BaseException) -> bool:
    return isinstance(e, (FileNotFoundError, PermissionError)) or getattr(e, "status", None) in (401, 403, 404)


def _retryable(e: BaseException) -> bool:
    """Dropped connections, timeouts, 5xx and throttling: s3fs raises them as OSError, aiohttp and
    botocore as their own types once their own retries are spent."""
    if _permanent(e) or isinstance(e, (CacheError, _Closed)):
        return False
    mod = type(e).__module__.split(".", 1)[0]
    return isinstance(e, (OSError, TimeoutError, ConnectionError)) or mod in ("aiohttp", "botocore", "aiobotocore")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class _Flock:
    """An flock on a file in the lock folder; released by close(), or by the kernel when the process dies."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)

    def try_lock(self, mode: int) -> bool:
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class _Epoch:
    sequence: list[int]  # shard numbers, one per occurrence (a run of the plan), in read order
    uses: dict[int, list[int]] = field(default_factory=dict)  # shard -> its occurrence numbers
    claimed: int = 0  # occurrences [0, claimed) hold a claim (taken by the prefetch, kept by the reader)
    demand: int = 0  # occurrences [0, demand) were asked for by the reader
    released: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        for j, s in enumerate(self.sequence):
            self.uses.setdefault(s, []).append(j)

    def next_use(self, shard: int) -> int | None:
        """The shard's first occurrence the reader has not asked for yet (None: none left this epoch)."""
        uses = self.uses.get(shard, [])
        k = bisect.bisect_left(uses, self.demand)
        return uses[k] if k < len(uses) else None

    def awaited(self, shard: int) -> bool:
        return any(j < self.demand and j not in self.released for j in self.uses.get(shard, []))


class ShardCache:
    """Local copies of `tars` (and their `indexes`) in `folder`, at most `limit` bytes in all."""

    def __init__(
        self,
        tars: list[Remote],
        indexes: list[Remote],
        folder: str,
        limit: int | str | None = None,
        *,
        in_flight: int = IN_FLIGHT,
        verbose: bool = False,
    ) -> None:
        self.folder = os.path.abspath(folder)
        self.locks = os.path.join(self.folder, LOCKS)
        try:
            os.makedirs(self.locks, exist_ok=True)
        except OSError as e:
            raise CacheError(f"shard cache {self.folder}: cannot create it: {_one_line(e)}") from None
        self.limit = parse_size(limit) if limit is not None else default_limit(self.folder, self.usage())
        self.in_flight, self.verbose = max(1, in_flight), verbose
        self.stats = CacheStats()
        self._storages: dict[str, Storage] = {}
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)  # a claim dropped, the reader moved, closing
        self._claims: dict[int, int] = {}  # shard -> claims held in this process
        self._pins: dict[int, _Flock] = {}  # shard -> its shared pin lock, held while claimed
        self._jobs: dict[int, Future] = {}  # shard -> its latest fetch
        self._progress: dict[str, tuple[int, int]] = {}  # local name -> (bytes so far, total) of downloads
        self._reserved = 0  # bytes this process made room for that no .part file holds yet
        self._epoch = _Epoch([])
        self._closed = False
        with ThreadPoolExecutor(8, thread_name_prefix="shard-cache-head") as pool:
            self.tars = list(pool.map(self._locate, tars))
            self._index_files = list(pool.map(self._locate, indexes))
        self._by_name = {t.name: s for s, t in enumerate(self.tars)}
        self._stems = {t.remote.stem for t in self.tars}
        self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="shard-cache")
        self._ranges = ThreadPoolExecutor(self.in_flight * RANGES_PER_SHARD, thread_name_prefix="shard-range")

    # -- the reader's side ----------------------------------------------------------------------
    def fetch_indexes(self) -> list[str]:
        """Local paths of every shard's .idx, downloaded once per machine (small; kept while the set is used)."""
        with ThreadPoolExecutor(8, thread_name_prefix="shard-cache-idx") as pool:
            return list(pool.map(lambda f: self._ensure(f, None), self._index_files))

    def local_path(self, shard: int) -> str:
        """Where shard number `shard` lives once it is cached (what get() returns)."""
        return os.path.join(self.folder, self.tars[shard].name)

    def start_epoch(self, sequence: list[int]) -> None:
        """This epoch's shard occurrences in the reader's order; prefetching starts at once."""
        self.end_epoch()
        with self._mutex:
            self._epoch = _Epoch(list(sequence))
            self._pump()

    def get(self, j: int) -> str:
        """Local path of occurrence j's shard, pinned until release(j); waits for its download."""
        ep = self._epoch
        shard = ep.sequence[j]
        for _ in range(3):
            with self._mutex:
                if ep is not self._epoch or self._closed:
                    raise CacheError(f"{self.tars[shard].remote.url}: asked for after its epoch ended")
                ep.demand = max(ep.demand, j + 1)
                self._pump()
                self._changed.notify_all()  # a prefetch waiting for room may now be the one awaited
                job = self._jobs[shard]
            path = self._wait(job, self.tars[shard])
            if os.path.exists(path):  # pinned now: it stays until release(j)
                return path
            with self._mutex:  # evicted before our claim pinned it, or given up by an old epoch's job
                if self._jobs.get(shard) is job:
                    self._jobs[shard] = self._pool.submit(self._fetch_tar, shard)
        raise CacheError(f"{self.tars[shard].remote.url}: cannot keep it in {self.folder} (evicted repeatedly)")

    def release(self, j: int) -> None:
        with self._mutex:
            ep = self._epoch
            if j >= ep.claimed or j in ep.released:
                return
            ep.released.add(j)
            self._unclaim(ep.sequence[j])
            self._pump()
        self._trim()

    def _trim(self) -> None:
        """Back under the limit once the reader lets go of shards it held past it."""
        over = self.usage() - self.limit
        if over > 0:
            self._evict(over, None)

    def end_epoch(self) -> None:
        """Drop every claim the epoch still holds (at its end, or when the reader stopped early)."""
        with self._mutex:
            ep = self._epoch
            for j in range(ep.claimed):
                if j not in ep.released:
                    ep.released.add(j)
                    self._unclaim(ep.sequence[j])
            self._epoch = _Epoch([])
            self._changed.notify_all()
        if not self._closed:
            self._trim()

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self.end_epoch()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ranges.shutdown(wait=True, cancel_futures=True)

    # -- claims and prefetch (called under self._mutex) -----------------------------------------
    def _pump(self) -> None:
        """Claim (pin) the next occurrences, up to `in_flight` past the reader, and fetch their shards."""
        ep = self._epoch
        while ep.claimed < len(ep.sequence) and ep.claimed < ep.demand + self.in_flight and not self._closed:
            shard = ep.sequence[ep.claimed]
            ep.claimed += 1
            self._claims[shard] = self._claims.get(shard, 0) + 1
            if self._claims[shard] == 1:
                pin = _Flock(self._lock_path(self.tars[shard], "pin"))
                fcntl.flock(pin.fd, fcntl.LOCK_SH)  # an evictor holds it exclusively only while it unlinks
                self._pins[shard] = pin
            job = self._jobs.get(shard)
            if job is None or job.done():
                self._jobs[shard] = self._pool.submit(self._fetch_tar, shard)

    def _unclaim(self, shard: int) -> None:
        self._claims[shard] -= 1
        if self._claims[shard] == 0:
            self._pins.pop(shard).close()
            self._changed.notify_all()

    def _wait(self, job: Future, local: _Local) -> str:
        start, reported, got0 = time.monotonic(), None, self.stats.bytes_downloaded
        while True:
            try:
                return job.result(timeout=1.0)
            except TimeoutError:
                now = time.monotonic()
                if self.verbose and (reported is None or now - reported >= 5.0):
                    reported = now
                    self._report_wait(local, now - start, self.stats.bytes_downloaded - got0)

    def _report_wait(self, local: _Local, waited: float, got: int) -> None:
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

    # -- one file (pool threads) ------------------------------------------------------------------
    def _fetch_tar(self, shard: int) -> str:
        return self._ensure(self.tars[shard], shard)

    def _ensure(self, local: _Local, shard: int | None) -> str:
        """The local path of a file, downloaded under its lock when it is not here (tars: room made first).

        A tar no occurrence of the epoch wants any more is not downloaded: its path comes back
        missing and get() asks again.
        """
        final = os.path.join(self.folder, local.name)
        if self._valid(final, local.size):
            self._served(local, shard, hit=True)
            return final
        reservation = [0]
        if shard is not None and not self._make_room(local, shard, reservation):
            return final
        lock = _Flock(self._lock_path(local, "lock"))
        try:
            while not lock.try_lock(fcntl.LOCK_EX):  # another process downloads it: wait, then use its copy
                if self._valid(final, local.size):
                    self._served(local, shard, hit=True)
                    return final
                self._check_open()
                time.sleep(POLL_S)
            if self._valid(final, local.size):
                self._served(local, shard, hit=True)
                return final
            self._remove_parts(local.name)  # a killed process's half-written copy: we hold its lock now
            self._download(local, final, reservation)
            self._served(local, shard, hit=False)
            self._remove_old_versions(local)
            return final
        finally:
            lock.close()
            self._unreserve(reservation)

    def _locate(self, remote: Remote) -> _Local:
        if remote.sha256 and remote.size is not None:
            return _Local(remote, remote.sha256[:16], remote.size)
        fs, path = self._fs_path(remote.url)
        info = self._remote_call(remote.url, lambda: fs.info(path))
        etag = str(info.get("ETag") or info.get("etag") or info.get("size"))
        return _Local(remote, "e" + hashlib.sha256(etag.encode()).hexdigest()[:15], int(info["size"]))

    @staticmethod
    def _valid(path: str, size: int) -> bool:
        try:
            return os.stat(path).st_size == size
        except FileNotFoundError:
            return False

    def _served(self, local: _Local, shard: int | None, hit: bool) -> None:
        with self._mutex:
            self.stats.bytes_served += local.size
            if shard is not None:
                if hit:
                    self.stats.hits += 1
                else:
                    self.stats.misses += 1

    def _check_open(self) -> None:
        if self._closed:
            raise _Closed()

    def _unreserve(self, reservation: list[int]) -> None:
        with self._mutex:
            self._reserved -= reservation[0]
            reservation[0] = 0

    def _download(self, local: _Local, final: str, reservation: list[int]) -> None:
        """Stream into a preallocated .part, hashing as it comes; rename once size and sha256 match."""
        remote = local.remote
        part = f"{final}{PART}{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
        try:
            for attempt in (1, 2):
                digest, got = self._stream_to(local, part, reservation)
                if got == local.size and (remote.sha256 is None or digest == remote.sha256):
                    os.replace(part, final)
                    return
                what = (
                    f"{got} bytes, expected {local.size}"
                    if got != local.size
                    else (f"sha256 {digest}, the manifest says {remote.sha256}")
                )
                if attempt == 2:
                    raise CacheError(f"{remote.url}: {what}, twice: the object does not match the manifest")
                log.warning("%s: %s; downloading it once more", remote.url, what)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(part)
            with self._mutex:
                self._progress.pop(local.name, None)

    def _stream_to(self, local: _Local, part: str, reservation: list[int]) -> tuple[str, int]:
        sha, done = hashlib.sha256(), 0
        fd = os.open(part, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            self._preallocate(fd, local)
            self._unreserve(reservation)  # the .part now holds the room itself
            used = self.usage()
            with self._mutex:
                self.stats.peak_bytes = max(self.stats.peak_bytes, used)
                self._progress[local.name] = (0, local.size)
            for chunk in self._chunks(local):
                sha.update(chunk)
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    self._raise_full(e, local, local.size - done)
                done += len(chunk)
                with self._mutex:
                    self.stats.bytes_downloaded += len(chunk)
                    self._progress[local.name] = (done, local.size)
            os.ftruncate(fd, done)  # a short object must not look whole through its preallocation
            os.fsync(fd)
        finally:
            os.close(fd)
        return sha.hexdigest(), done

    def _preallocate(self, fd: int, local: _Local) -> None:
        """Reserve the whole file first, so a full disk fails at once in one line, not halfway."""
        if local.size == 0:
            return
        try:
            os.posix_fallocate(fd, 0, local.size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # else: a full disk shows on write
                self._raise_full(e, local, local.size)

    def _raise_full(self, e: OSError, local: _Local, need: int) -> None:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(self.folder).free
            raise CacheError(
                f"shard cache {self.folder} is full: {local.remote.stem} needs {need / 1e6:.1f} MB, "
                f"{free / 1e6:.1f} MB free there (free space, or lower --cache-limit / cache_limit)"
            ) from None
        raise e

    def _chunks(self, local: _Local) -> Iterator[bytes]:
        """The object's bytes in order: one GET, or parallel ranged GETs handed on in order."""
        url, size = local.remote.url, local.size
        fs, path = self._fs_path(url)
        if size <= PART_BYTES:
            data = self._remote_call(url, lambda: fs.cat_file(path))
            self._check_open()
            yield data
            return
        starts = list(range(0, size, PART_BYTES))
        window: list[Future] = []
        for k in range(len(starts) + RANGES_PER_SHARD):
            if k < len(starts):
                a = starts[k]
                window.append(self._ranges.submit(self._range, fs, path, url, a, min(size, a + PART_BYTES)))
            if len(window) == RANGES_PER_SHARD or (k >= len(starts) and window):
                data = window.pop(0).result()
                self._check_open()
                yield data

    def _range(self, fs, path: str, url: str, start: int, end: int) -> bytes:
        self._check_open()
        data = self._remote_call(url, lambda: fs.cat_file(path, start=start, end=end))
        if len(data) != end - start:
            raise CacheError(f"{url}: asked for bytes {start}..{end}, got {len(data)} (the object changed?)")
        return data

    def _remote_call(self, url: str, fn: Callable):
        try:
            return retry_call(fn, policy=POLICY, retryable=_retryable, what=url, log=log)
        except (CacheError, _Closed):
            raise
        except Exception as e:
            if _permanent(e):
                missing = isinstance(e, FileNotFoundError) or getattr(e, "status", 0) == 404
                raise CacheError(f"{url}: {'not found' if missing else 'access denied'} ({_one_line(e)})") from None
            raise CacheError(f"{url}: giving up after {POLICY.attempts} attempts: {_one_line(e)}") from None

    def _fs_path(self, url: str):
        parent, _, name = url.rpartition("/")
        with self._mutex:
            storage = self._storages.get(parent)
            if storage is None:
                storage = self._storages[parent] = Storage(parent)
        return storage.fs, f"{storage._root_path}/{name}"

    def _lock_path(self, local: _Local, kind: str) -> str:
        return os.path.join(self.locks, f"{local.name}.{kind}")

    # -- room under the limit ---------------------------------------------------------------------
    def usage(self) -> int:
        """Bytes of every file in the folder (every process's; .part files at their reserved size)."""
        total = 0
        with os.scandir(self.folder) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    if e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        total += max(st.st_size, st.st_blocks * 512) if PART in e.name else st.st_size
        return total

    def _make_room(self, local: _Local, shard: int, reservation: list[int]) -> bool:
        """Wait until the shard fits under the limit, evicting what may go; False: no longer wanted."""
        while True:
            self._check_open()
            used = self.usage()
            with self._mutex:
                ep = self._epoch
                awaited, after = ep.awaited(shard), ep.next_use(shard)
                if not awaited and after is None:
                    return False
                self.stats.peak_bytes = max(self.stats.peak_bytes, used)
                need = used + self._reserved + local.size - self.limit
                if need <= 0:
                    self._reserved += local.size
                    reservation[0] = local.size
                    return True
            freed = self._evict(need, None if awaited else after)
            with self._mutex:
                if freed >= need or awaited:  # the awaited shard goes ahead: limit + shards in flight
                    self._reserved += local.size
                    reservation[0] = local.size
                    return True
                self._changed.wait(timeout=0.25)  # a release, here or in another process, frees a candidate

    def _candidates(self, after: int | None) -> list[str]:
        """Files that may go, in the order they should: old versions first, then this reader's
        finished shards, then by next use, furthest first; only those needed later than `after`
        (None: any). Claimed shards never; another process's pins are checked by _evict."""
        ranked = []
        with self._mutex:
            ep, claims = self._epoch, dict(self._claims)
        with os.scandir(self.folder) as it:
            for e in it:
                if not e.is_file(follow_symlinks=False) or PART in e.name:
                    continue
                shard = self._by_name.get(e.name)
                if shard is None:
                    if e.name.partition(".")[2] in self._stems:  # an old version of one of our tars
                        ranked.append(((0, 0), e.name))
                    continue
                if claims.get(shard):
                    continue
                nxt = ep.next_use(shard)
                if after is not None and nxt is not None and nxt <= after:
                    continue
                ranked.append(((1, -nxt if nxt is not None else -(1 << 40)), e.name))
        ranked.sort()
        return [name for _, name in ranked]

    def _evict(self, need: int, after: int | None) -> int:
        freed = evicted = 0
        self._remove_dead_parts()
        for name in self._candidates(after):
            if freed >= need:
                break
            pin = _Flock(os.path.join(self.locks, f"{name}.pin"))
            try:
                if not pin.try_lock(fcntl.LOCK_EX):  # pinned: another process reads it
                    continue
                path = os.path.join(self.folder, name)
                with contextlib.suppress(FileNotFoundError):
                    size = os.path.getsize(path)
                    os.remove(path)
                    freed, evicted = freed + size, evicted + 1
            finally:
                pin.close()  # before taking the mutex: _pump blocks on this pin while holding it
        with self._mutex:
            self.stats.evicted += evicted
        return freed

    def _remove_parts(self, name: str) -> None:
        for e in os.listdir(self.folder):
            if e.startswith(name + PART):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.folder, e))

    def _remove_dead_parts(self) -> None:
        """.part files whose download lock nobody holds: their process died; they only take room."""
        for e in os.listdir(self.folder):
            if PART not in e:
                continue
            lock = _Flock(os.path.join(self.locks, e.split(PART, 1)[0] + ".lock"))
            try:
                if lock.try_lock(fcntl.LOCK_EX):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.folder, e))
            finally:
                lock.close()

    def _remove_old_versions(self, local: _Local) -> None:
        """The set was rebuilt: the old copy of this file goes once the new one is here (unless pinned)."""
        for e in os.listdir(self.folder):
            if e != local.name and PART not in e and e.partition(".")[2] == local.remote.stem:
                pin = _Flock(os.path.join(self.locks, f"{e}.pin"))
                try:
                    if pin.try_lock(fcntl.LOCK_EX):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(os.path.join(self.folder, e))
                finally:
                    pin.close()


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

    def segments(self, batches: int, max_runs: int) -> list[tuple[int, int]]:
        """Cut batches [0, batches) into stretches reading at most `max_runs` runs each (a single
        batch may read more): DALI's reader needs every file of a pipeline present when it is built."""
        out, b0, lo = [], 0, 0
        for b in range(batches):
            hi = int(np.searchsorted(self.first_batch, b, side="right")) - 1  # last run batch b reads
            if hi - lo + 1 > max_runs and b > b0:
                out.append((b0, b))
                b0 = b
                lo = int(np.searchsorted(self.last_batch, b, side="left"))  # first run batch b reads
        out.append((b0, batches))
        return out
