"""One remote file into the cache folder: ranged GETs pinned to one version, hashed as they come.

- Where: `locate` asks the store for a file's size and ETag when no manifest gives its size and
  sha256 (HEAD); the local name's tag is the sha256's head, else the ETag's hash.
- How: a file over `part_bytes` comes as parallel ranged GETs (`ranges` at once), handed on in
  order, hashed (sha256) and written into a preallocated `<final>.part-<token>`; only a whole,
  matching file is renamed into place (CacheFolder.land).
- One version: on S3 every ranged GET after the first carries If-Match with the ETag the first
  answer had (or the one `locate` saw), and every answer's ETag is compared with it; an object
  replaced mid-download therefore fails its next GET (412) instead of mixing two versions. With
  a manifest sha256 the new version is downloaded once more and the digest decides; without one
  the reader's index may not match it, and the download fails naming the URL.
- A size or digest mismatch downloads once more, then fails naming the URL.
- Retries: connection errors, timeouts, 5xx and throttling, with backoff and jitter
  (shards/retry.py, on top of botocore's own); 403 and 404 fail at once naming the URL.
- The wire: a download nobody waits for yields (between ranges) while a download a reader waits
  for is transferring anywhere on the node (CacheFolder's `.urgent/` markers).
- A full disk: the space is evicted from the cache where possible (CacheFolder.make_space), and
  the write tried again; it fails in one line naming the folder only when nothing can go.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
from fsspec.asyn import sync

from loaders.cache.errors import CacheError, Closed, Replaced, one_line, permanent, precondition_failed, retryable
from loaders.cache.folder import URGENT, CacheFolder, Reservation
from shards.redact import redact_url
from shards.retry import RetryPolicy, retry_call
from shards.storage import S3_OPTIONS

log = logging.getLogger("loaders.cache")

PART_BYTES = 4 << 20  # ranged GET size; a file larger than this is fetched in parallel parts
RANGES_PER_FILE = 4  # parallel ranged GETs per file (memory: PART_BYTES each)
POLL_S = 0.05  # how often a yielding download looks again
POLICY = RetryPolicy(attempts=6, base_delay=0.5, max_delay=20.0)


@dataclass(frozen=True)
class Remote:
    """One remote file; its verified bytes take the local name `<tag>.<file name>`."""

    url: str
    size: int | None  # None: asked from the store (no manifest beside the shards)
    sha256: str | None

    @property
    def stem(self) -> str:
        """The file's name: the URL's path alone, so a SPEC's query token names no local file."""
        return self.url.partition("?")[0].partition("#")[0].rsplit("/", 1)[-1]

    @property
    def shown(self) -> str:
        """The URL as messages may show it (no credentials)."""
        return redact_url(self.url)


@dataclass(frozen=True)
class Local:
    """Where a remote file lives here, and the version (ETag) it was located at, if asked."""

    remote: Remote
    tag: str
    size: int
    etag: str | None = None

    @property
    def name(self) -> str:
        return f"{self.tag}.{self.remote.stem}"


def fs_path(url: str):
    """(fsspec file system, path in it) of a URL; S3 with shards.storage's retry settings."""
    options = S3_OPTIONS if url.startswith(("s3://", "s3a://")) else {}
    return fsspec.core.url_to_fs(url, **options)


def is_s3(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"s3", "s3a"} & set(protocols)) and hasattr(fs, "call_s3")


def call(remote: Remote, fn: Callable):
    """fn() with retries; a failure becomes one CacheError line naming the (redacted) URL."""
    try:
        return retry_call(fn, policy=POLICY, retryable=retryable, what=remote.shown, log=log)
    except (CacheError, Closed, Replaced):
        raise
    except Exception as e:
        if precondition_failed(e):
            raise Replaced() from None
        if permanent(e):
            missing = isinstance(e, FileNotFoundError) or getattr(e, "status", 0) == 404
            words = "not found" if missing else "access denied"
            raise CacheError(f"{remote.shown}: {words} ({one_line(e)})") from None
        raise CacheError(f"{remote.shown}: giving up after {POLICY.attempts} attempts: {one_line(e)}") from None


def locate(remote: Remote) -> Local:
    """The local name and size of a remote file: from the manifest, else from the store (HEAD)."""
    if remote.sha256 and remote.size is not None:
        return Local(remote, remote.sha256[:16], remote.size)
    fs, path = fs_path(remote.url)
    info = call(remote, lambda: fs.info(path))
    etag = info.get("ETag") or info.get("etag")
    tag = "e" + hashlib.sha256(str(etag or info.get("size")).encode()).hexdigest()[:15]
    return Local(remote, tag, int(info["size"]), str(etag) if etag else None)


class Downloader:
    """Downloads into a CacheFolder; `closed()` stops every transfer, `on_bytes(n)` counts them."""

    def __init__(
        self,
        folder: CacheFolder,
        closed: Callable[[], bool],
        on_bytes: Callable[[str, int, int], None],
        *,
        part_bytes: int = PART_BYTES,
        ranges: int = RANGES_PER_FILE,
        threads: int = 8,
    ) -> None:
        self.folder, self.closed, self.on_bytes = folder, closed, on_bytes
        self.part_bytes, self.ranges = part_bytes, ranges
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-range")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _check_open(self) -> None:
        if self.closed():
            raise Closed()

    # -- the whole file --------------------------------------------------------------------------
    def download(
        self,
        local: Local,
        final: str,
        res: Reservation,
        awaited: Callable[[], bool],
        check: Callable[[str], None] | None = None,
    ) -> None:
        """Into res's .part, then (size and sha256 right, and `check(part)` passed) renamed to `final`;
        a mismatch downloads once more, then fails."""
        remote, part = local.remote, res.part(self.folder.path)
        for attempt in (1, 2):
            try:
                digest, got = self._stream_to(local, part, awaited)
            except Replaced:
                if remote.sha256 is None or attempt == 2:
                    raise CacheError(
                        f"{remote.shown}: replaced in the store while it downloaded (its ETag changed); "
                        "the set changed under the reader"
                    ) from None
                log.warning("%s: replaced in the store while it downloaded; downloading the new version", remote.shown)
                local = Local(remote, local.tag, local.size)  # pinned again, to the new version
                continue
            if got == local.size and (remote.sha256 is None or digest == remote.sha256):
                if check is not None:
                    check(part)  # before the rename: a file in place is one a reader may trust
                self.folder.land(res, final)
                return
            what = (
                f"{got} bytes, expected {local.size}"
                if got != local.size
                else (f"sha256 {digest}, the manifest says {remote.sha256}")
            )
            if attempt == 2:
                raise CacheError(f"{remote.shown}: {what}, twice: the object does not match the manifest")
            log.warning("%s: %s; downloading it once more", remote.shown, what)

    def _stream_to(self, local: Local, part: str, awaited: Callable[[], bool]) -> tuple[str, int]:
        sha, done = hashlib.sha256(), 0
        fd = os.open(part, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            with contextlib.ExitStack() as urgent:
                marked: list[bool] = []
                self._preallocate(fd, local)
                self.on_bytes(local.name, 0, local.size)  # in flight from now (the waiting reader's report)
                for chunk in self._chunks(local, lambda: self._yield_wire(local, awaited, urgent, marked)):
                    sha.update(chunk)
                    self._write(fd, chunk, local, local.size - done)
                    done += len(chunk)
                    self.on_bytes(local.name, done, local.size)
            os.ftruncate(fd, done)  # a short object must not look whole through its preallocation
            os.fsync(fd)
        finally:
            os.close(fd)
        return sha.hexdigest(), done

    def _yield_wire(
        self, local: Local, awaited: Callable[[], bool], urgent: contextlib.ExitStack, marked: list[bool]
    ) -> None:
        """Before each ranged GET: a waited-for download marks itself urgent; any other waits while
        an urgent one transfers on this node, so the shard a reader waits for gets the bandwidth."""
        while True:
            self._check_open()
            if awaited():
                if not marked:  # once: the marker lives until the file is written
                    urgent.enter_context(self.folder.marked(URGENT, local.name))
                    marked.append(True)
                return
            if not self.folder.others_urgent(local.name):
                return
            time.sleep(POLL_S)

    # -- disk --------------------------------------------------------------------------------------
    def _preallocate(self, fd: int, local: Local) -> None:
        """Reserve the whole file first, so a full disk shows at once (and is evicted from), not halfway."""
        while local.size:
            try:
                os.posix_fallocate(fd, 0, local.size)
                return
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    return  # no fallocate here: a full disk shows on write
                self._full(e, local, local.size)

    def _write(self, fd: int, chunk: bytes, local: Local, need: int) -> None:
        view = memoryview(chunk)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except OSError as e:
                self._full(e, local, need)

    def _full(self, e: OSError, local: Local, need: int) -> None:
        """ENOSPC/EDQUOT: evict what may go and return (the caller tries again); else fail in one line."""
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise e
        if self.folder.make_space(need) > 0:
            log.warning("shard cache %s: the disk is full; evicted cached shards to make room", self.folder.path)
            return
        raise self.folder.full_error(local.remote.stem, need) from None

    # -- the wire ----------------------------------------------------------------------------------
    def _chunks(self, local: Local, before_get: Callable[[], None]) -> Iterator[bytes]:
        """The object's bytes in order: ranged GETs, `ranges` at a time, handed on in order."""
        fs, path = fs_path(local.remote.url)
        pin = [local.etag]  # the version every GET must return; the first answer's if not known
        lock = threading.Lock()
        starts = list(range(0, local.size, self.part_bytes))
        window: list[Future] = []
        for k in range(len(starts) + self.ranges):
            if k < len(starts):
                before_get()
                a = starts[k]
                window.append(
                    self._pool.submit(self._range, fs, path, local, a, min(local.size, a + self.part_bytes), pin, lock)
                )
                if k == 0 and pin[0] is None and is_s3(fs):
                    # The first answer names the version every later GET is pinned to (If-Match), so
                    # none goes out before it is known: an object replaced meanwhile is refused by
                    # the store (412), never read in part.
                    futures.wait(window[:1])
            if len(window) == self.ranges or (k >= len(starts) and window):
                data = window.pop(0).result()
                self._check_open()
                yield data

    def _range(self, fs, path: str, local: Local, start: int, end: int, pin: list, lock: threading.Lock) -> bytes:
        self._check_open()
        if is_s3(fs):
            data, etag = call(local.remote, lambda: self._s3_get(fs, path, start, end, pin[0]))
            with lock:
                if pin[0] is None:
                    pin[0] = etag
                elif etag is not None and etag != pin[0]:
                    raise Replaced()
        else:
            data = call(local.remote, lambda: fs.cat_file(path, start=start, end=end))
        if len(data) != end - start:
            raise CacheError(
                f"{local.remote.shown}: asked for bytes {start}..{end}, got {len(data)} (the object changed?)"
            )
        return data

    @staticmethod
    def _s3_get(fs, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, str | None]:
        bucket, key, _ = fs.split_path(path)
        kw = {"IfMatch": etag} if etag else {}
        resp = fs.call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **kw)
        try:
            return sync(fs.loop, resp["Body"].read), resp.get("ETag")
        finally:
            resp["Body"].close()
