"""The one root of every cache shardline keeps (DESIGN.md section 1, "Caches")."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SHARDLINE_CACHE_DIR"


def cache_root() -> Path:
    """$SHARDLINE_CACHE_DIR, else ~/.cache/shardline: remote shards under shards/, the DALI plugin
    under dali-plugin/, downloaded source archives under downloads/."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "shardline")
