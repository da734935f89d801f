"""Download archives with resume, retries and checksums: local paths, http(s):// and s3://.

A 150 GB download breaks halfway; starting over is not an option. Bytes go to `<name>.part`
in the cache folder; after a dropped connection the next attempt asks only for the rest
(HTTP Range, or a ranged S3 GET), with exponential backoff and jitter between attempts. A
finished file is checked against its MD5 before it takes its final name, and a sidecar
`<name>.md5` lets the next run reuse it without hashing 150 GB again.

A URL may carry credentials (user:password@, a presigned URL's signature): it is used only to
open the connection. The cache's file names come from the URL's path alone (`url_file_name`),
and every message, log line and exception text here names the redacted URL (shards/redact.py).
Two URLs that differ only in their credentials (a presigned URL signed again, another user's
password) name the same object, so they share one cache entry: a fresh signature resumes the
`.part` of an expired one instead of starting over, and the MD5 check stands as before.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import fsspec
import requests

from shards.checksums import md5_file
from shards.redact import redact_text, redact_url
from shards.retry import RetryPolicy, retry_call
from shards.storage import is_url

log = logging.getLogger("shards.fetch")
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download that cannot succeed (4xx, checksum mismatch twice, retries exhausted)."""


class _Retryable(Exception):
    pass


def url_file_name(url: str) -> str:
    """The file name a URL's object has here: its path's last part, percent-decoded, without the
    query or fragment (where a presigned URL's signature is) or the userinfo (where a password is)."""
    path = urlsplit(redact_url(url)).path if "://" in url else url
    name = posixpath.basename(unquote(path).rstrip("/"))
    if not name or name in (".", "..") or "\0" in name:
        raise FetchError(f"{redact_url(url)}: the URL names no file")
    return name


def _http_attempt(url: str, part: str, policy: RetryPolicy, progress: Callable[[int, int | None], None] | None) -> None:
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=policy.timeout) as r:
            if r.status_code == 416 and have:  # asked past the end: the part is already whole
                return
            if r.status_code in (429,) or r.status_code >= 500:
                raise _Retryable(f"HTTP {r.status_code}")
            if r.status_code >= 400:
                raise FetchError(f"{redact_url(url)}: HTTP {r.status_code} {r.reason}")
            if have and r.status_code != 206:
                have = 0  # the server ignored Range: start over rather than append garbage
            total = r.headers.get("Content-Length")
            total = int(total) + have if total is not None else None
            with open(part, "ab" if have else "wb") as f:
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    have += len(chunk)
                    if progress:
                        progress(have, total)
            if total is not None and have < total:
                raise _Retryable(f"connection closed at {have} of {total} bytes")
    # requests and urllib3 quote the URL (its query, sometimes decoded) in their messages
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
        raise _Retryable(f"{type(e).__name__}: {redact_text(str(e), url)}") from None
    except requests.RequestException as e:  # a bad URL, too many redirects: the same on every try
        raise FetchError(f"{redact_url(url)}: {type(e).__name__}: {redact_text(str(e), url)}") from None


def _fs_attempt(url: str, part: str, policy: RetryPolicy, progress: Callable[[int, int | None], None] | None) -> None:
    have = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        fs, path = fsspec.core.url_to_fs(url)
        total = int(fs.size(path))
        if have >= total:
            return
        with fs.open(path, "rb", block_size=8 * CHUNK) as src, open(part, "ab") as f:
            src.seek(have)  # a ranged GET from where the last attempt stopped
            while have < total:
                chunk = src.read(min(8 * CHUNK, total - have))
                if not chunk:
                    raise _Retryable(f"stream ended at {have} of {total} bytes")
                f.write(chunk)
                have += len(chunk)
                if progress:
                    progress(have, total)
    # botocore and aiohttp quote the URL, or its bucket and key, in their messages
    except FileNotFoundError:
        raise FetchError(f"{redact_url(url)}: not found") from None
    except PermissionError as e:
        raise FetchError(f"{redact_url(url)}: access denied: {redact_text(str(e), url)}") from None
    except OSError as e:  # s3fs maps throttling and 5xx to OSError subclasses after its own retries
        raise _Retryable(f"{type(e).__name__}: {redact_text(str(e), url)}") from None
    except (ValueError, TypeError) as e:  # fsspec's answer to a URL it cannot parse
        raise FetchError(f"{redact_url(url)}: {type(e).__name__}: {redact_text(str(e), url)}") from None


def _download(url: str, part: str, policy: RetryPolicy, progress) -> None:
    attempt_fn = _http_attempt if url.startswith(("http://", "https://")) else _fs_attempt
    try:
        retry_call(
            lambda: attempt_fn(url, part, policy, progress),
            policy=policy,
            retryable=lambda e: isinstance(e, _Retryable),
            what=redact_url(url),
            log=log,
        )
    except _Retryable as e:
        raise FetchError(f"{redact_url(url)}: giving up after {policy.attempts} attempts: {e}") from None


def fetch(
    url: str,
    cache_dir: str,
    *,
    md5: str | None = None,
    policy: RetryPolicy | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> str:
    """Return a local path holding `url`'s bytes, verified against `md5` when given.

    Local paths are returned as they are (checked, not copied). A mismatch costs one fresh
    download; a second mismatch raises FetchError naming the file and both digests.
    """
    policy = policy or RetryPolicy()
    if not is_url(url):
        path = url.removeprefix("file://")
        if not os.path.exists(path):
            raise FetchError(f"{path}: no such file")
        if md5 and (got := md5_file(path, progress=False)) != md5:
            raise FetchError(f"{path}: MD5 {got} does not match the expected {md5}")
        return path
    os.makedirs(cache_dir, exist_ok=True)
    name = url_file_name(url)
    final, part, sidecar = (os.path.join(cache_dir, n) for n in (name, name + ".part", name + ".md5"))
    if os.path.exists(final) and os.path.exists(sidecar):
        with open(sidecar) as f:
            recorded = f.read().strip()
        if md5 is None or recorded == md5:
            log.info("%s: reusing verified download %s", name, final)
            return final
    for fresh in (False, True):
        if fresh and os.path.exists(part):
            os.remove(part)
        _download(url, part, policy, progress)
        got = md5_file(part, progress=False)
        if md5 is None or got == md5:
            with open(sidecar + ".tmp", "w") as f:
                f.write(got + "\n")
            os.replace(part, final)
            os.replace(sidecar + ".tmp", sidecar)
            return final
        log.warning("%s: MD5 %s, expected %s; downloading once more", name, got, md5)
    os.remove(part)
    raise FetchError(f"{name}: MD5 {got} does not match the expected {md5} (after a fresh download)")
