"""Progressive resizing: the training image size of each epoch (FFCV's resolution schedule).

The size is a pure function of the epoch and the command line, never of what ran before, so a
resumed run (exact or elastic) trains each epoch at the size the uninterrupted run would:
nothing about it goes into a checkpoint.
"""

from __future__ import annotations

STEP = 8  # sizes are multiples of 8: what FFCV rounds to, and friendly to conv strides and tensor cores


def parse_ramp(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B), 0 <= A < B; ValueError (one line) otherwise."""
    first, sep, last = text.partition(":")
    try:
        a, b = int(first), int(last)
    except ValueError:
        a = b = -1
    if not sep or a < 0 or b <= a:
        raise ValueError(f"--ramp-epochs must be A:B with 0 <= A < B (epochs), not {text!r}")
    return a, b


def size_at(epoch: int, low: int, high: int, first: int, last: int) -> int:
    """`low` up to epoch `first`, then linear to `high` at epoch `last` and after, rounded to a
    multiple of STEP in between (never below `low`, never above `high`: non-decreasing)."""
    if epoch <= first:
        return low
    if epoch >= last:
        return high
    exact = low + (high - low) * (epoch - first) / (last - first)
    return min(high, max(low, round(exact / STEP) * STEP))


def schedule(image_size: int, min_image_size: int | None, ramp_epochs: str | None):
    """epoch -> training image size for these options (constant without a ramp)."""
    if min_image_size is None or ramp_epochs is None:
        return lambda epoch: image_size
    first, last = parse_ramp(ramp_epochs)
    return lambda epoch: size_at(epoch, min_image_size, image_size, first, last)
