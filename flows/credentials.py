"""A `--source` URL's credentials kept out of the Prefect server: the CLI's side of redaction.

The Prefect server stores a flow run's parameters as given, in its database and its UI. So
`python -m flows build-shards`, which runs the flow in its own process, hands the flow the
redacted URL (shards/redact.py) and keeps the real one here, in memory; the download task asks
`reveal()` for it when it opens the connection. A deployment run has no such process in front
of it: its parameters reach the server as they were typed, which is why a URL that carries
credentials is warned about once (`warn_once`), and the README says how to pass them instead
(~/.netrc for http(s), the AWS credential chain for s3://).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from shards.redact import has_userinfo, redact_url

_real: dict[str, str] = {}  # redacted URL -> the URL as given, for this process only
_warned: set[str] = set()
_lock = threading.Lock()


def hide(url: str | None) -> str | None:
    """The URL to pass on as a flow parameter: redacted, the real one remembered for `reveal`."""
    if url is None:
        return None
    safe = redact_url(url)
    if safe != url:
        with _lock:
            _real[safe] = url
    return safe


def reveal(url: str) -> str:
    """The real URL behind one `hide` gave out in this process; any other URL as it is."""
    with _lock:
        return _real.get(url, url)


def warn_once(url: str | None, warn: Callable[[str], None]) -> None:
    """Warn (redacted, once per URL and process) when a URL carries user:password@."""
    if not url or not has_userinfo(url):
        return
    safe = redact_url(url)
    with _lock:
        if safe in _warned:
            return
        _warned.add(safe)
    warn(
        f"{safe} carries credentials in the URL: they show in the process list and shell history, and a "
        "deployment run's parameters are stored as given by the Prefect server; prefer ~/.netrc for "
        "http(s) and the AWS credential chain for s3:// (README: passing credentials safely)"
    )
