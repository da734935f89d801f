"""One build at a time per output: an exclusive lock taken before anything is written.

Two builds into one output (a deployment run triggered twice, a retry while the first run
still works) would interleave their shards under one manifest. So a build holds the output:

- a local output: the file `.shardline.lock` at the output root, held with flock(2). The
  kernel drops a flock when its holder dies, however it dies, so a lock left by a killed
  build on this host is simply taken over. The file records host, pid, start time and the
  build's parameters, for the message the next build prints; it is removed on release.
- an object store (s3://): a lease object `.shardline.lock`, created by a conditional put
  (If-None-Match: *), so of two builds exactly one creates it. The holder renews it every
  `ttl/3` seconds with a put conditional on its own ETag (If-Match); a lease not renewed for
  `ttl` seconds (measured in the store's own clock: its Date header against the object's
  Last-Modified) belonged to a dead build and is taken over, again by If-Match, so of two
  builds taking over one expired lease only one succeeds. A lease whose holder ran on this
  host under a pid that no longer exists is taken over at once, the same way, without waiting
  for it to expire (a killed build rerun on the same machine). Each call to the store is
  retried on transient errors (5xx, throttling, dropped connections), as Storage's are.

A second build fails at once with one line (`LockHeld`) naming the holder and since when,
or, with wait=True, waits for the lock. Any orchestrator takes the lock the same way:
`with output_lock(storage, params): ...` (shards/build.py's build(), the Prefect flow,
its deployments and its Dask runner all do).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime

from shards.redact import redact_text, redact_url, redact_values
from shards.retry import retry_call
from shards.storage import REMOTE_POLICY, Storage, transient

LOCK_NAME = ".shardline.lock"
LEASE_TTL = 300.0  # seconds an object-store lease lives without renewal: a few minutes
POLL_SECONDS = 2.0  # how often a waiting build looks again
log = logging.getLogger("shards.lock")


class LockHeld(RuntimeError):
    """Another build holds the output; the message is one line naming it."""


class LockLost(RuntimeError):
    """This build's lease was taken over (it was not renewed in time): it must not publish."""


def _holder_record(params: dict | None) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        # read by other builds and, on object storage, by anyone who can list the bucket
        "params": redact_values(params or {}),
    }


def _held_message(root: str, holder: dict | None) -> str:
    if holder:
        who = f"build pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
    else:
        who = "another build"
    return f"{redact_url(root)} is locked by {who}: wait, or choose another --output (or pass --wait)"


class _FileLock:
    """flock on `<root>/.shardline.lock`, with the holder written into the file."""

    def __init__(self, storage: Storage, params: dict | None) -> None:
        self.storage, self.params = storage, params
        self.path = os.path.join(storage.root, LOCK_NAME)
        self.fd: int | None = None
        self.created_root = False

    def try_acquire(self) -> dict | None:
        """Take the lock and return None, or return who holds it ({} if not known yet)."""
        if not os.path.isdir(self.storage.root):
            os.makedirs(self.storage.root, exist_ok=True)
            self.created_root = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                return self._read_holder()
            # The holder before us may have removed the file after we opened it: then we
            # hold a lock on a name nobody else sees, so open the current file again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_record(self.params)) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return None

    def _read_holder(self) -> dict:
        """Who holds the lock; {} (held, by someone unknown) while the holder is still writing it.
        Never None: None means "acquired" to try_acquire's caller."""
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}") or {}
        except (OSError, json.JSONDecodeError):
            return {}

    def check(self) -> None:
        """A flock cannot be lost while the process lives."""

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # unlink while still holding: a waiter then re-opens the new name
        os.close(self.fd)
        self.fd = None
        if self.created_root:
            with contextlib.suppress(OSError):  # only if nothing was written there
                os.rmdir(self.storage.root)


class _S3Lease:
    """A lease object created with If-None-Match and renewed with If-Match."""

    def __init__(self, storage: Storage, params: dict | None, ttl: float) -> None:
        self.storage, self.ttl = storage, ttl
        # "started" stays the first put's; "token" tells this lease from another of the same process
        self.record = _holder_record(params) | {"ttl_s": ttl, "token": uuid.uuid4().hex}
        self.fs = storage.fs
        self.bucket, self.key, _ = self.fs.split_path(storage.url(LOCK_NAME))
        self.etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _call(self, method: str, **kwargs) -> dict:
        return retry_call(
            lambda: self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs),
            policy=REMOTE_POLICY,
            # 412 (s3fs: EINVAL) answers a condition: another build's lease, not a failure to retry
            retryable=lambda e: transient(e) and getattr(e, "errno", None) != errno.EINVAL,
            what=f"{method} {self.storage.url(LOCK_NAME)}",
            log=log,
        )

    def _put(self, **condition: str) -> str:
        # "renewed" makes every renewal's body, so its ETag, new: If-Match then tells them apart.
        record = self.record | {"renewed": time.time()}
        body = json.dumps(record).encode()
        meta = {"holder": json.dumps({k: record[k] for k in ("host", "pid", "started", "ttl_s", "token")})}
        return self._call("put_object", Body=body, Metadata=meta, **condition)["ETag"]

    def _head(self) -> dict | None:
        try:
            return self._call("head_object")
        except FileNotFoundError:
            return None

    def _ours(self, holder: dict) -> bool:
        """Our own lease: a put that succeeded although its answer was lost, then retried."""
        return holder.get("token") == self.record["token"]

    def try_acquire(self) -> dict | None:
        try:
            self.etag = self._put(IfNoneMatch="*")
        except FileExistsError:
            head = self._head()
            if head is None:
                return self.try_acquire()  # released between our put and our look
            try:  # {}, never None (which would mean "acquired"), when the record is unreadable
                holder = json.loads(head.get("Metadata", {}).get("holder") or "{}") or {}
            except json.JSONDecodeError:
                holder = {}
            if self._ours(holder):
                self.etag = head["ETag"]
            elif self._expired(head, holder) or _dead_here(holder):
                try:  # take over exactly this lease: a newer one has another ETag
                    self.etag = self._put(IfMatch=head["ETag"])
                except OSError:
                    return holder  # another build took it over first
                log.warning("took over the stale lease of %s", _held_message(self.storage.root, holder))
            else:
                return holder
        self._renewer = threading.Thread(target=self._renew, name="lease-renewer", daemon=True)
        self._renewer.start()
        return None

    @staticmethod
    def _expired(head: dict, holder: dict | None) -> bool:
        """Age in the store's own clock (its Date header minus Last-Modified), so host clocks never matter."""
        ttl = float((holder or {}).get("ttl_s", LEASE_TTL))
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else dt.datetime.now(dt.timezone.utc)
        return (now - head["LastModified"]).total_seconds() >= ttl

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3) and not self.lost.is_set():
            self.renew_once()
        if self.lost.is_set():
            log.error("lost the lease on %s: another build took the output over", redact_url(self.storage.root))

    def renew_once(self) -> None:
        try:
            self.etag = self._put(IfMatch=self.etag)
        except FileNotFoundError:
            self.lost.set()  # removed by someone: another build may be writing now
        except OSError as e:
            if e.errno == errno.EINVAL:  # 412: taken over after we missed our renewals
                self.lost.set()
            else:  # a network blip: the next renewal, well inside the ttl, tries again
                log.warning("lease on %s not renewed: %s", redact_url(self.storage.root), redact_text(str(e)))

    def check(self) -> None:
        if self.lost.is_set():
            raise LockLost(
                f"{redact_url(self.storage.root)}: this build's lease was taken over by another build; not publishing"
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.etag is not None and not self.lost.is_set():
            with contextlib.suppress(OSError):  # If-Match: never delete a lease another build took over
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        self.etag = None


def _dead_here(holder: dict) -> bool:
    """The holder ran on this host under a pid that no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class _NoLock:
    def try_acquire(self) -> None:
        return None

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


class OutputLock:
    """The lock on one output; use `output_lock()`."""

    def __init__(self, storage: Storage, params: dict | None = None, ttl: float = LEASE_TTL) -> None:
        self.storage = storage
        if not storage.remote:
            self._impl: _FileLock | _S3Lease | _NoLock = _FileLock(storage, params)
        elif "s3" in (storage.fs.protocol if isinstance(storage.fs.protocol, tuple) else (storage.fs.protocol,)):
            self._impl = _S3Lease(storage, params, ttl)
        else:  # gs://, memory://, ...: no conditional put here yet; say so rather than pretend
            log.warning(
                "%s: no output lock on this kind of store (local and s3:// only): one build at a time",
                redact_url(storage.root),
            )
            self._impl = _NoLock()

    def acquire(self, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> None:
        told = False
        while (holder := self._try()) is not None:
            message = _held_message(self.storage.root, holder)
            if not wait:
                raise LockHeld(message)
            if not told:
                (on_wait or log.warning)(f"waiting: {message}")
                told = True
            time.sleep(POLL_SECONDS)

    def _try(self) -> dict | None:
        try:
            return self._impl.try_acquire()
        except OSError as e:  # a missing bucket, bad credentials, a read-only folder: one line
            reason = redact_text(str(e).splitlines()[0], self.storage.root) if str(e) else type(e).__name__
            raise PermissionError(
                f"cannot write to {redact_url(self.storage.root)}: {type(e).__name__}: {reason}"
            ) from None

    def check(self) -> None:
        """Raise LockLost if the lock is no longer ours (call before publishing the manifest)."""
        self._impl.check()

    def release(self) -> None:
        self._impl.release()


@contextlib.contextmanager
def output_lock(
    storage: Storage | str,
    params: dict | None = None,
    *,
    wait: bool = False,
    ttl: float = LEASE_TTL,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[OutputLock]:
    """Hold the output for the duration of the block (LockHeld at once if another build holds it)."""
    lock = OutputLock(storage if isinstance(storage, Storage) else Storage(storage), params, ttl)
    lock.acquire(wait=wait, on_wait=on_wait)
    try:
        yield lock
    finally:
        lock.release()
