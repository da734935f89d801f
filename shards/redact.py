"""URLs made safe to show: the one place that knows which parts of a URL are secrets.

The real URL is used only to open a connection; everything a person or another process can read
(log lines, progress and summary artifacts, error messages, lock records and lease objects, cache
file names, checkpoints, TensorBoard) gets `redact_url(url)` or `redact_text(text, url)`.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters whose values are credentials: AWS SigV4/SigV2 presigned URLs, Azure/GCS
# signatures, and the usual token names. Compared case-insensitively.
SECRET_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "signature",
        "sig",
        "token",
        "access_token",
        "key",
        "x-goog-signature",
        "x-goog-credential",
        "awsaccesskeyid",
    }
)


def has_userinfo(url: str) -> bool:
    """Whether the URL carries user:password@ (worth a warning: it is stored wherever it is passed)."""
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """The URL with its userinfo and the values of known secret query parameters replaced by ***.

    Anything that is not a URL with a scheme (a local path) comes back unchanged.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*/:")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str, *urls: str) -> str:
    """`text` (an exception's message, a log line) with every given URL, and its secret parts
    wherever they appear alone, replaced by the redacted form."""
    for url in urls:
        if not url:
            continue
        safe = redact_url(url)
        if safe == url:
            continue
        text = text.replace(url, safe)
        for secret in _secrets(url):
            text = text.replace(secret, MASK)
    return text


def _secrets(url: str) -> list[str]:
    """The secret substrings of a URL (userinfo, secret parameter values), longest first."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found += [userinfo, *[p for p in userinfo.split(":")[1:] if p]]
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k.lower() in SECRET_PARAMS and v:
            found.append(v)
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)
