"""Byte sizes as people write them: the one parser for --shard-size, --cache-limit and friends."""

from __future__ import annotations

import re

# Decimal units as disks and object stores count them; the i-forms are binary.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")
EXAMPLES = "1GB, 500MB, 64MiB, 1000000"


def parse_size(value: str | int, option: str = "size") -> int:
    """'1GB' -> 10**9, '500MB', '64MiB', '1.5TB', 12345 -> bytes; more than 0.

    Raises ValueError with one line naming `option` (e.g. "--cache-limit") for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"{option} {value!r}: not a size (examples: {EXAMPLES})")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(f"{option} {value!r}: not a size (examples: {EXAMPLES})")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{option} {value!r}: must be more than 0 bytes")
    return n
