"""Which sample goes into which shard: a seeded shuffle of the whole split, then cuts.

DALI and webdataset only shuffle within a small buffer at read time, so the mixing of
classes has to happen here, across the whole split. The plan depends only on the source's
item list, the seed and the size options, so it is the same on every rerun: that is what lets
a resumed build reuse the shards already published.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from shards.manifest import index_name, shard_name
from shards.types import Item, Options
from shards.writer import SAMPLE_OVERHEAD


@dataclass(frozen=True)
class ShardSpec:
    dataset: str
    split: str
    number: int  # the shard number: its position in the split
    name: str  # imagenet-train-000.tar
    items: tuple[Item, ...]

    @property
    def index_name(self) -> str:
        return index_name(self.name)

    def fingerprint(self, params: dict) -> str:
        """Identifies what this shard will hold; a published shard is reused only on a match."""
        h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
        h.update(self.name.encode())
        for it in self.items:
            h.update(f"\0{it.key}\0{it.label}\0{it.source}\0{it.size}".encode())
        return h.hexdigest()


def shuffle_items(items: list[Item], seed: int, split: str) -> list[Item]:
    # Sort first so the result does not depend on the order the source listed members in
    # (the ImageNet val tar is not in alphabetical order; a folder walk is OS-dependent).
    ordered = sorted(items, key=lambda it: (it.key, it.source))
    rng = random.Random(f"{seed}:{split}")
    rng.shuffle(ordered)
    return ordered


def cut(items: list[Item], options: Options) -> list[list[Item]]:
    """Cut the shuffled items into shards of `shard_samples` items or about `shard_bytes`.

    By bytes, the shard count is fixed first (total / shard_bytes, rounded) and items are
    then spread evenly, so shards come out of similar size rather than one small tail shard.
    """
    n = len(items)
    if n == 0:
        return []
    if options.shard_samples:
        count = -(-n // options.shard_samples)
    else:
        total = sum(it.size + SAMPLE_OVERHEAD for it in items)
        count = max(1, round(total / options.shard_bytes))
    count = min(count, n)
    base, extra = divmod(n, count)
    if options.shard_samples:
        return [items[i : i + options.shard_samples] for i in range(0, n, options.shard_samples)]
    out, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        out.append(items[start : start + size])
        start += size
    return out


def plan_split(dataset: str, split: str, items: list[Item], options: Options) -> list[ShardSpec]:
    groups = cut(shuffle_items(items, options.seed, split), options)
    return [
        ShardSpec(dataset, split, i, shard_name(dataset, split, i, len(groups)), tuple(g)) for i, g in enumerate(groups)
    ]
