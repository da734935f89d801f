"""URLs made safe to show: the one place that knows which parts of a URL are secrets.

The real URL is used only to open a connection; everything a person or another process can read
(log lines, progress and summary artifacts, error messages, lock records and lease objects, cache
file names, checkpoints, TensorBoard) gets `redact_url(url)`, `redact_text(text, url)` or, for a
whole record, `redact_values(record)`.

A secret hides in a URL in two places: the userinfo (`user:password@`) and the values of known
query (or fragment) parameters such as a presigned URL's X-Amz-Signature. Both are replaced by
`***`, keeping the rest of the URL byte for byte, so a redacted URL still says which object it is.
Client libraries quote a URL back in their errors in many shapes (only its path and query, or
with the password percent-decoded), so `redact_text` also replaces each secret alone, in its
raw, decoded and re-encoded forms, and any URL or `secret_param=value` it finds in the text.
"""

from __future__ import annotations

import re
from typing import TypeVar
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit

T = TypeVar("T")
MASK = "***"
# Query parameters whose values are credentials: AWS SigV4/SigV2 presigned URLs, Azure SAS and
# GCS signatures, and the usual token and password names. Compared case-insensitively.
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
        "api_key",
        "apikey",
        "password",
        "secret",
        "client_secret",
        "refresh_token",
        "id_token",
        "private_token",
    }
)
# A secret shorter than this is not replaced where it stands alone in a text (it would mangle
# ordinary words); inside a URL it is always replaced, whatever its length.
MIN_LOOSE = 4
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_PARAM_IN_TEXT = re.compile(
    r"(?i)(?<![A-Za-z0-9_-])(" + "|".join(re.escape(p) for p in sorted(SECRET_PARAMS, key=len, reverse=True)) + r")"
    r"(=|%3D)([^&\s'\"<>;,)]+)"
)


def _userinfo_span(url: str) -> tuple[int, int] | None:
    """Where a URL's userinfo is (start, index of its '@'), or None.

    An AWS secret key often holds an unencoded '/', which ends the netloc early
    (s3://KEY:SECRET/PART@bucket): a netloc whose "port" is not a number, followed by an '@',
    is read as the userinfo it is, not as host:port."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or not url[len(parts.scheme) :].startswith("://"):
        return None
    start = len(parts.scheme) + 3
    if "@" in parts.netloc:
        return start, start + parts.netloc.rindex("@")
    host, colon, port = parts.netloc.rpartition(":")
    if colon and host and not port.isdigit() and not parts.netloc.startswith("[") and "@" in parts.path:
        return start, url.index("@", start)
    return None


def has_userinfo(url: str) -> bool:
    """Whether the URL carries user:password@ (worth a warning: it is stored wherever it is passed)."""
    return _userinfo_span(url) is not None


def _redact_pairs(query: str) -> str:
    """A query (or fragment) with the values of secret parameters masked, every other byte kept."""
    if not query:
        return query
    out = []
    for pair in query.split("&"):
        key, eq, value = pair.partition("=")
        if eq and value and unquote_plus(key).lower() in SECRET_PARAMS:
            pair = f"{key}={MASK}"
        out.append(pair)
    return "&".join(out)


def redact_url(url: str) -> str:
    """The URL with its userinfo and the values of known secret query parameters replaced by ***.

    Every other byte is kept as it was; anything that is not a URL with a scheme (a local path)
    comes back unchanged.
    """
    if "://" not in url:
        return url
    span = _userinfo_span(url)
    if span is not None:
        url = url[: span[0]] + MASK + url[span[1] :]
    head, hash_, fragment = url.partition("#")
    base, mark, query = head.partition("?")
    return base + mark + _redact_pairs(query) + hash_ + _redact_pairs(fragment)


def redact_text(text: str, *urls: str | None) -> str:
    """`text` (an exception's message, a log line) made safe to show.

    Each given URL is replaced by its redacted form and each of its secrets by ***, wherever and
    in whatever encoding it appears; then any other URL in the text is redacted, and any
    `secret_param=value` (a URL's query quoted without its scheme, as urllib3 does) masked.
    """
    for url in urls:
        if not url:
            continue
        safe = redact_url(url)
        if safe != url:
            text = text.replace(url, safe)
        for secret in _secrets(url):
            if len(secret) >= MIN_LOOSE:
                text = text.replace(secret, MASK)
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _PARAM_IN_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)


def redact_values(value: T) -> T:
    """A record (dicts, lists, tuples of strings and numbers) with every string passed through
    redact_text: a config, a lock's parameters or a hyperparameter table, made safe to write."""
    if isinstance(value, str):
        return redact_text(value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)  # type: ignore[return-value]
    return value


def _forms(raw: str) -> set[str]:
    """A secret as it may be quoted back: raw, percent-decoded, and re-encoded (with and without its slashes)."""
    forms = {raw, unquote(raw), unquote_plus(raw)}
    for decoded in list(forms):
        forms |= {quote(decoded, safe=""), quote(decoded), quote_plus(decoded, safe="")}
    return forms


def _secrets(url: str) -> list[str]:
    """The secret substrings of a URL (password or whole userinfo, secret parameter values) in
    every form they may take, longest first, so a longer form is replaced before its part."""
    found: set[str] = set()
    span = _userinfo_span(url)
    if span is not None:
        userinfo = url[span[0] : span[1]]
        found |= _forms(userinfo)
        user, colon, password = userinfo.partition(":")
        if colon and password:
            found |= _forms(password)
        elif not colon:
            found |= _forms(user)  # a bare token as the user name (https://TOKEN@host/...)
    head, _, fragment = url.partition("#")
    for section in (head.partition("?")[2], fragment):
        for pair in section.split("&") if section else []:
            key, eq, value = pair.partition("=")
            if eq and value and unquote_plus(key).lower() in SECRET_PARAMS:
                found |= _forms(value)
    return sorted((s for s in found if s), key=len, reverse=True)
