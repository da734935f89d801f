"""Retries with exponential backoff and full jitter: the one helper every remote call here uses.

Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): the wait before attempt
k+1 is uniform in [0, min(cap, base * 2**k)], which spreads the retries of many clients apart
instead of having them hammer a throttled store in lock step.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from shards.redact import redact_text

T = TypeVar("T")


@dataclass
class RetryPolicy:
    attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 30.0
    timeout: float = 60.0  # seconds without a byte before a connection counts as dead

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def retry_call(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool],
    what: str,
    log: logging.Logger,
) -> T:
    """Call `fn` until it returns, retrying the exceptions `retryable` accepts; the last one propagates.

    `what` names the operation in the warning logged before each wait; that line is redacted
    (shards/redact.py), as the errors of client libraries often quote the URL they called.
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as e:
            if attempt == policy.attempts - 1 or not retryable(e):
                raise
            wait = policy.delay(attempt)
            log.warning(
                "%s: %s; retrying in %.1fs (attempt %d/%d)",
                redact_text(what),
                redact_text(str(e)),
                wait,
                attempt + 2,
                policy.attempts,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")
