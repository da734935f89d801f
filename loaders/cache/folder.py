"""The cache folder: its files, pins, reservations and evictions, shared by every process of a node.

- Files: a verified copy is `<tag>.<remote file name>` (the tag: the head of its sha256, or of its
  ETag where no manifest gives one), so a rebuilt set never reads an old copy; a download in
  progress is `<final name>.part-<token>`, renamed only once whole and checked.
- One budget per node: every download first records a reservation of its full size in
  `.ledger.json`, under an exclusive flock on `.ledger.lock` held for the whole decision (scan,
  evict, record). So the processes of a node see each other's downloads before they start, not
  after. Downloads may take the folder above `limit` by at most EXCESS_SHARDS of the largest
  shards, node-wide (in flight, or landed and about to be read); when readers release what they
  read, `trim()` brings the folder back under the limit.
- Pins: a shard being read is pinned by a shared flock on `.locks/<name>.pin`; eviction takes it
  exclusively without blocking, so it never removes a file someone reads.
- Eviction takes the file whose next use by any local rank is furthest (`next_use`, from the node
  plan; old versions and files of no local plan first), and, for a download, only files needed
  later than the downloaded shard: a prefetch never pushes out a shard that hits sooner.
- A process that dies (kill -9) loses its flocks with it: its owner lock `.locks/owner-<token>`
  can then be taken, and the next ledger user drops its reservations and deletes its `.part`.
- A full disk: `make_space` evicts what may go and the write is tried again; only when nothing can
  go does the download fail, in one line naming the folder.
- Priority: a reader waiting for a shard marks it in `.wanted/`; its download, once transferring,
  marks itself in `.urgent/`, and every other download of the node yields the wire to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from loaders.cache.errors import CacheError, DiskFull, one_line

log = logging.getLogger("loaders.cache")

LOCKS, WANTED, URGENT = ".locks", ".wanted", ".urgent"
LEDGER, LEDGER_LOCK = ".ledger.json", ".ledger.lock"
PART = ".part-"
LEDGER_BYTES = 64 << 10  # the ledger's preallocated size (a reservation takes about 150 bytes)
EXCESS_SHARDS = 2  # downloads a waiting reader may take above the limit, in the largest shard's size
STUCK_S = 5.0  # a waited-for shard with no room, nothing evictable and nothing in flight, for this long


@dataclass(frozen=True)
class Reservation:
    token: str
    name: str
    bytes: int
    excess: bool  # admitted above the limit (a reader waits for it)

    def part(self, folder: str) -> str:
        return os.path.join(folder, f"{self.name}{PART}{self.token}")


_OPEN: set[int] = set()  # descriptors of every Flock of this process


def _close_inherited() -> None:
    """In a forked child (a DataLoader worker): close the parent's lock files. An flock belongs to
    the open file, which a fork shares: a child holding a copy would keep the parent's pins and
    the ledger's lock alive after the parent let go of them."""
    for fd in list(_OPEN):
        with contextlib.suppress(OSError):
            os.close(fd)
    _OPEN.clear()


os.register_at_fork(after_in_child=_close_inherited)


class Flock:
    """An flock on a file; released by close(), or by the kernel when the process dies. Each
    Flock is its own open file, so two threads of one process exclude each other too."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o666)
        _OPEN.add(self.fd)

    def try_lock(self, mode: int) -> bool:
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def lock(self, mode: int) -> Flock:
        fcntl.flock(self.fd, mode)
        return self

    def close(self) -> None:
        if self.fd in _OPEN:
            _OPEN.discard(self.fd)
            with contextlib.suppress(OSError):
                os.close(self.fd)


def locked_file(path: str, mode: int) -> Flock:
    """A new file at `path`, already locked when it appears there: made under a hidden name, locked,
    then renamed (the lock stays with the file), so a prober never finds it unlocked and takes it
    for a dead process's."""
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.new")
    lock = Flock(tmp).lock(mode)
    os.replace(tmp, path)
    return lock


class CacheFolder:
    """The node's shared cache folder at `path`, at most `limit` bytes (+ the waited-for excess)."""

    def __init__(self, path: str, limit: int, largest: int, keep: Callable[[str], bool]) -> None:
        self.path, self.limit, self.largest, self.keep = path, limit, largest, keep
        self.locks = os.path.join(path, LOCKS)
        try:
            for sub in (LOCKS, WANTED, URGENT):
                os.makedirs(os.path.join(path, sub), exist_ok=True)
        except OSError as e:
            raise CacheError(f"shard cache {path}: cannot create it: {one_line(e)}") from None
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._alive = locked_file(os.path.join(self.locks, f"owner-{self.owner}"), fcntl.LOCK_SH)
        self._serial = itertools.count()
        self.next_use: Callable[[str], float] = lambda name: math.inf  # set by the facade (node plan)
        self.peak = 0  # most the folder held (files + reservations), as this process saw it
        self.evicted = 0
        self._stuck_since: dict[str, float] = {}
        self._warned = False

    def close(self) -> None:
        with self._ledger() as records:
            for token in [t for t, r in records.items() if r["owner"] == self.owner]:
                self._drop(records, token)
        self._alive.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.locks, f"owner-{self.owner}"))

    # -- the ledger ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _ledger(self) -> Iterator[dict[str, dict]]:
        """The node's reservations (token -> record), under the node-wide lock; written back after.

        Written in place into blocks allocated up front (LEDGER_BYTES, padded with spaces), so a
        disk the shards filled can still record the evictions that make room on it."""
        lock = Flock(os.path.join(self.path, LEDGER_LOCK)).lock(fcntl.LOCK_EX)
        try:
            fd = os.open(os.path.join(self.path, LEDGER), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o666)
            try:
                size = os.fstat(fd).st_size
                raw = os.pread(fd, size, 0).decode(errors="replace").strip() if size else ""
                try:
                    records = json.loads(raw) if raw else {}
                except ValueError:
                    records = {}  # a writer died mid-write: its reservations go with it
                before = json.dumps(records, sort_keys=True)
                self._drop_dead(records)
                yield records
                text = json.dumps(records, sort_keys=True)
                if text != before:
                    data = text.encode()
                    room = max(size, LEDGER_BYTES)
                    while room < len(data):
                        room *= 2
                    if room > size:
                        os.posix_fallocate(fd, 0, room)
                    os.pwrite(fd, data.ljust(room), 0)
            finally:
                os.close(fd)
        finally:
            lock.close()

    def _alive_owner(self, owner: str, seen: dict[str, bool]) -> bool:
        if owner == self.owner:
            return True
        if owner not in seen:
            probe = Flock(os.path.join(self.locks, f"owner-{owner}"))
            try:
                seen[owner] = not probe.try_lock(fcntl.LOCK_EX)
            finally:
                probe.close()
            if not seen[owner]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.locks, f"owner-{owner}"))
        return seen[owner]

    def _drop_dead(self, records: dict[str, dict]) -> None:
        """Reservations of processes that died (their owner flock is free): gone, with their .part."""
        seen: dict[str, bool] = {}
        for token in [t for t, r in records.items() if not self._alive_owner(r["owner"], seen)]:
            self._drop(records, token)

    def _drop(self, records: dict[str, dict], token: str) -> None:
        r = records.pop(token)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.path, f"{r['name']}{PART}{token}"))

    def _files(self, records: dict[str, dict]) -> dict[str, int]:
        """Finished files -> bytes; a .part no reservation accounts for is a dead download's: removed."""
        files: dict[str, int] = {}
        with os.scandir(self.path) as it:
            for e in it:
                if e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                    continue
                if PART in e.name:
                    if e.name.split(PART, 1)[1] not in records:
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(e.path)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    files[e.name] = e.stat(follow_symlinks=False).st_size
        return files

    def usage(self) -> int:
        """Bytes of the finished files plus every process's reservations (downloads in flight)."""
        with self._ledger() as records:
            return sum(self._files(records).values()) + sum(r["bytes"] for r in records.values())

    # -- admission, landing, eviction ----------------------------------------------------------
    def reserve(self, name: str, size: int, next_use: float, awaited: bool) -> Reservation | None:
        """Room for a download of `size` bytes; None: no room now (a prefetch gives up, a waiting
        reader asks again). Downloads (and what they brought that no reader has let go of yet) may
        take the folder above the limit by EXCESS_SHARDS of the largest shards, node-wide; past that,
        only files needed later than `next_use` are evicted. trim() brings it back under the limit
        once the readers release what they read, taking the file needed furthest ahead: deciding
        then, not when the download starts, keeps a shard that is needed again soon."""
        with self._ledger() as records:
            files = self._files(records)
            used = sum(files.values()) + sum(r["bytes"] for r in records.values())
            self.peak = max(self.peak, used)
            cap = self.limit + EXCESS_SHARDS * self.largest
            if used + size > cap:
                used -= self._evict(files, used + size - cap, later_than=next_use)
            if used + size > cap and not (awaited and self._stuck(name, records)):
                return None
            self._stuck_since.pop(name, None)
            token = f"{self.owner}-{next(self._serial)}"
            excess = used + size > self.limit
            records[token] = {"name": name, "bytes": size, "owner": self.owner, "excess": excess}
            self.peak = max(self.peak, used + size)
            return Reservation(token, name, size, excess)

    def _stuck(self, name: str, records: dict[str, dict]) -> bool:
        """The readers hold more than the limit allows and nothing is in flight to free anything:
        after STUCK_S of that, the waited-for shard goes ahead anyway (rather than every rank wait
        for the others forever), with one warning."""
        if records:
            self._stuck_since.pop(name, None)
            return False
        since = self._stuck_since.setdefault(name, time.monotonic())
        if time.monotonic() - since < STUCK_S:
            return False
        if not self._warned:
            self._warned = True
            log.warning(
                "shard cache %s: the readers hold more than cache_limit %.1f MB at once; going over it "
                "(a larger cache_limit avoids this)",
                self.path,
                self.limit / 1e6,
            )
        return True

    def land(self, res: Reservation, final: str) -> None:
        """The download is whole and checked: rename it into place; its bytes now count as a file."""
        with self._ledger() as records:
            os.replace(res.part(self.path), final)
            records.pop(res.token, None)
            self._remove_old_versions(res.name)
            self.peak = max(self.peak, sum(self._files(records).values()) + sum(r["bytes"] for r in records.values()))

    def _remove_old_versions(self, name: str) -> None:
        """The set was rebuilt: the old copy of this file goes once the new one is here (unless pinned)."""
        stem = name.partition(".")[2]
        for e in os.listdir(self.path):
            if e != name and PART not in e and not e.startswith(".") and e.partition(".")[2] == stem:
                self.remove_unpinned(e)

    def cancel(self, res: Reservation) -> None:
        with self._ledger() as records:
            if res.token in records:
                self._drop(records, res.token)

    def trim(self, keep_within: float = -1) -> None:
        """Back under the limit once readers let go of what they held past it; files needed within
        `keep_within` batches (prefetched for the reader, part of the downloads' excess) stay."""
        with self._ledger() as records:
            files = self._files(records)
            over = sum(files.values()) + sum(r["bytes"] for r in records.values()) - self.limit
            if over > 0:
                self._evict(files, over, later_than=keep_within)

    def make_space(self, need: int) -> int:
        """The disk is full: evict what may go (any file no one pins), furthest next use first."""
        with self._ledger() as records:
            return self._evict(self._files(records), need, later_than=-1)

    def _evict(self, files: dict[str, int], need: int, later_than: float) -> int:
        """Remove unpinned files needed later than `later_than`, furthest first, until `need` bytes went."""
        ranked = sorted(((self.next_use(n), n) for n in files if not self.keep(n)), key=lambda t: t[0], reverse=True)
        freed = 0
        for nxt, name in ranked:
            if freed >= need or nxt <= later_than:
                break
            if self.remove_unpinned(name):
                freed += files.pop(name)
                self.evicted += 1
                log.debug("evicted %s (next use in %s batches; needed: later than %s)", name, nxt, later_than)
        return freed

    def remove_unpinned(self, name: str) -> bool:
        pin = Flock(self.pin_path(name))
        try:
            if not pin.try_lock(fcntl.LOCK_EX):  # pinned: a reader holds it
                return False
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.path, name))
            return True
        finally:
            pin.close()

    def full_error(self, stem: str, need: int) -> DiskFull:
        free = shutil.disk_usage(self.path).free
        return DiskFull(
            f"shard cache {self.path} is full: {stem} needs {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free there "
            "and nothing left to evict (free space, or lower --cache-limit / cache_limit)"
        )

    # -- locks and markers -----------------------------------------------------------------------
    def pin_path(self, name: str) -> str:
        return os.path.join(self.locks, f"{name}.pin")

    def download_lock(self, name: str) -> Flock:
        return Flock(os.path.join(self.locks, f"{name}.lock"))

    @contextlib.contextmanager
    def marked(self, kind: str, name: str) -> Iterator[None]:
        """A live marker `<kind>/<name>.<token>` while the block runs (kind: WANTED or URGENT)."""
        path = os.path.join(self.path, kind, f"{name}@{self.owner}-{next(self._serial)}")
        mark = locked_file(path, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            mark.close()

    def _live_marks(self, kind: str) -> list[str]:
        """Names with a live marker of `kind` (a dead process's markers are removed on the way)."""
        out = []
        folder = os.path.join(self.path, kind)
        for entry in os.listdir(folder):
            if entry.startswith("."):
                continue  # being created (locked_file)
            mark = Flock(os.path.join(folder, entry))
            try:
                if mark.try_lock(fcntl.LOCK_SH):  # nobody holds it: its process died
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, entry))
                    continue
            finally:
                mark.close()
            out.append(entry.rsplit("@", 1)[0])
        return out

    def wanted(self, name: str) -> bool:
        return name in self._live_marks(WANTED)

    def others_urgent(self, name: str) -> bool:
        return any(n != name for n in self._live_marks(URGENT))
