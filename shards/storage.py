"""Output locations: a local folder or any fsspec URL (s3://, gs://, memory://).

Everything that writes goes through `Storage.publish`, which makes an object visible only
once it is whole: locally a temporary name in the same folder then `os.replace` (atomic on
POSIX); remotely an upload of a finished local file (s3fs uploads large files in multipart
and S3 only shows an object when its upload completes).

A remote root may end in a query (`https://host/set?token=...`, a server that wants a token on
every request): the query goes with every object's URL, after its name.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import fsspec

from shards.redact import redact_text, redact_url
from shards.retry import RetryPolicy, retry_call

TMP_MARK = ".tmp-"  # temporary names carry this; a rerun deletes any it finds
REMOTE_ATTEMPTS = 6  # our own retries, on top of botocore's, for stores that fail for a while
# botocore's "standard" mode retries 5xx and throttling (SlowDown) with jittered backoff.
S3_OPTIONS = {"config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
log = logging.getLogger("shards.storage")
REMOTE_POLICY = RetryPolicy(attempts=REMOTE_ATTEMPTS)


def transient(e: BaseException) -> bool:
    """A remote error worth retrying: not a missing object, denied access or an existing one."""
    return isinstance(e, OSError) and not isinstance(e, _PERMANENT)


def _retry_remote(fn: Callable) -> Callable:
    """Retry a remote operation on transient errors (5xx, throttling, dropped connections).

    Missing objects and denied access are answers, not failures, and are raised at once.
    """

    @functools.wraps(fn)
    def wrapper(self: Storage, *args, **kwargs):
        if not self.remote:
            return fn(self, *args, **kwargs)
        return retry_call(
            lambda: fn(self, *args, **kwargs),
            policy=REMOTE_POLICY,
            retryable=transient,
            what=f"{fn.__name__} {self.root}",
            log=log,
        )

    return wrapper


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


class Storage:
    """A folder of named objects, local or remote."""

    def __init__(self, root: str | os.PathLike, scratch: str | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.remote = is_url(self.root)
        self.query = ""  # "?..." of a remote root, appended to every object's URL
        if self.remote and "?" in self.root:
            head, _, query = self.root.partition("?")
            self.root, self.query = head.rstrip("/"), f"?{query}"
        if self.remote:
            options = S3_OPTIONS if self.root.startswith(("s3://", "s3a://")) else {}
            self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **options)
        else:
            self.root = str(Path(str(root).removeprefix("file://")).resolve())
            self.fs, self._root_path = fsspec.filesystem("file"), self.root
        self.scratch = scratch  # local folder for remote uploads' staging files

    def __repr__(self) -> str:
        return f"Storage({redact_url(self.root)!r})"

    @property
    def shown(self) -> str:
        """The root as messages name it: its query kept, its credentials redacted."""
        return redact_url(f"{self.root}/{self.query}" if self.query else self.root)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}{self.query}"

    def _path(self, name: str) -> str:
        return f"{self._root_path}/{name}{self.query}"

    def makedirs(self) -> None:
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)

    def check_writable(self) -> None:
        """Fail in one line, before any work, if the output cannot be written.

        A probe object is written and deleted: that catches a missing bucket, bad
        credentials and read-only permissions alike, which a listing would not.
        """
        probe = f"_probe{TMP_MARK}{os.getpid()}"
        try:
            self.makedirs()
            self.write_bytes_atomic(probe, b"")
            self.remove(probe)
        except Exception as e:  # botocore, aiohttp and OS errors all end up here
            reason = redact_text(str(e).splitlines()[0], self.url("")) if str(e) else type(e).__name__
            raise PermissionError(f"cannot write to {redact_url(self.root)}: {type(e).__name__}: {reason}") from None

    @_retry_remote
    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    @_retry_remote
    def size(self, name: str) -> int:
        return int(self.fs.size(self._path(name)))

    @_retry_remote
    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self._path(name), "rb") as f:
            return f.read()

    def open(self, name: str, mode: str = "rb") -> BinaryIO:
        return self.fs.open(self._path(name), mode)

    @_retry_remote
    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(name), recursive=True)

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[str]:
        """A local path to write `name` to; published by `publish(name, path)`.

        Local output stages in the output folder itself (so the final rename is atomic and
        no scratch space is used); remote output stages in the scratch folder.
        """
        if self.remote:
            os.makedirs(self.scratch or tempfile.gettempdir(), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(name)}{TMP_MARK}", dir=self.scratch)
            os.close(fd)
        else:
            parent = os.path.dirname(self._path(name))
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(name)}{TMP_MARK}", dir=parent)
            os.close(fd)
        try:
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    @_retry_remote
    def publish(self, name: str, local_path: str) -> None:
        """Make the finished local file visible under `name`, whole or not at all."""
        if self.remote:
            self.fs.put_file(local_path, self._path(name))
        else:
            with open(local_path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(local_path, 0o644)  # mkstemp makes 0600: published shards must be readable by others
            os.replace(local_path, self._path(name))

    def write_bytes_atomic(self, name: str, data: bytes) -> None:
        with self.staging(name) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
            self.publish(name, tmp)

    def clean_temporaries(self) -> list[str]:
        """Delete what a killed run left half-written; returns the names removed."""
        removed: list[str] = []
        if self.remote:
            # Objects only appear whole, but a killed multipart upload leaves hidden, billed
            # parts behind: abort the ones under this prefix.
            protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
            if "s3" in protocols:
                bucket, _, prefix = self._root_path.partition("/")
                for up in self.fs.list_multipart_uploads(bucket):
                    if up["Key"].startswith(prefix.rstrip("/") + "/"):
                        self.fs.abort_mpu(bucket, up["Key"], up["UploadId"])
                        removed.append(up["Key"])
            return removed
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if TMP_MARK in f:
                    os.remove(os.path.join(dirpath, f))
                    removed.append(os.path.relpath(os.path.join(dirpath, f), self.root))
        return removed
