"""When a failed Prefect task is worth another try: the one retry_condition_fn of every task."""

from __future__ import annotations

from shards.build import BuildError
from shards.fetch import FetchError
from shards.lock import LockHeld, LockLost

# Mistakes, not hiccups: a wrong parameter, a missing file, a held output fail the same way twice.
FINAL = (BuildError, LockHeld, LockLost, ValueError, KeyError, TypeError, FileNotFoundError, PermissionError)


def worth_retrying(task, task_run, state) -> bool:
    """Retry I/O hiccups, not mistakes. A FetchError is final (4xx, MD5 wrong twice, bad
    output) unless fetch ran out of attempts: a long outage may be over by the task's next
    try, which resumes the download."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, FetchError):
        return "giving up after" in str(exc)
    return not isinstance(exc, FINAL)
