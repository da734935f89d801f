"""What can go wrong in the shard cache, and which remote errors are worth another attempt."""

from __future__ import annotations

from shards.storage import transient


class CacheError(RuntimeError):
    """The cache cannot provide a shard; the message is one line naming the (redacted) URL or the folder."""


class DiskFull(CacheError):
    """The cache folder's disk is full and nothing in it may be evicted."""


class Closed(Exception):
    """The cache was closed while a download or a wait was under way: stop quietly."""


class Replaced(Exception):
    """The object's ETag changed between the download's first and a later ranged GET."""


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def permanent(e: BaseException) -> bool:
    """A missing object or denied access: an answer, not a failure; no retry."""
    return isinstance(e, (FileNotFoundError, PermissionError)) or getattr(e, "status", None) in (401, 403, 404)


def precondition_failed(e: BaseException) -> bool:
    """S3's 412 to a GET with If-Match: the object is not the version the download started with.
    s3fs raises it as OSError(EINVAL, "At least one of the pre-conditions ... did not hold")."""
    text = f"{e} {e.__cause__ or ''}".lower()
    return "precondition" in text.replace("-", "") or getattr(e, "status", None) == 412


def retryable(e: BaseException) -> bool:
    """Dropped connections, timeouts, 5xx and throttling: s3fs raises them as OSError (shards.storage's
    `transient`), aiohttp and botocore as their own types once their own retries are spent."""
    if permanent(e) or precondition_failed(e) or isinstance(e, (CacheError, Closed, Replaced)):
        return False
    mod = type(e).__module__.split(".", 1)[0]
    return (
        transient(e) or isinstance(e, (TimeoutError, ConnectionError)) or mod in ("aiohttp", "botocore", "aiobotocore")
    )
