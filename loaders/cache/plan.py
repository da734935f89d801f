"""The node plan: when each shard is next needed by any rank of this node, this epoch or the next.

Every process of a node computes every local rank's plan itself (loaders/sharding.py's plans are
pure functions of seed, epoch, world size and rank), so the processes agree on one plan without
talking. Time is counted in batches from where this reading started; data-parallel ranks step in
lock step (every step ends in a collective), so batch b of every rank happens at about the same
time, and the next epoch's batch b happens at (this epoch's batches) + b.

From it the cache takes:
- eviction (Belady): the file whose next use by any local rank is furthest goes first, across
  the epoch boundary, so a rank never evicts a shard another rank is about to read;
- prefetch: each process fetches its own rank's shards in order of first need, past the end of
  the epoch into the next one, so the next epoch's first misses start during this one's tail.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from loaders.sharding import EpochPlan

NEVER = math.inf  # next use of a shard no local rank reads again in this epoch or the next
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"  # set by torchrun (and torch.distributed.launch) on every process


def local_ranks(rank: int, world_size: int, local_world_size: int | None = None) -> range:
    """The global ranks sharing this node's cache: LOCAL_WORLD_SIZE consecutive ranks (torchrun
    numbers ranks node by node); without it, every rank (one node)."""
    if local_world_size is None:
        env = os.environ.get(LOCAL_WORLD_SIZE, "")
        local_world_size = int(env) if env.isdigit() and int(env) > 0 else world_size
    n = max(1, min(local_world_size, world_size))
    node = rank // n
    return range(node * n, min(world_size, (node + 1) * n))


@dataclass(frozen=True)
class Run:
    """One stretch of rows reading one shard: from batch `first` to batch `last` (inclusive)."""

    shard: int
    first: int
    last: int


def _runs(plan: EpochPlan, offset: int) -> list[Run]:
    shard, start = plan.runs()
    stop = [*list(start[1:]), len(plan.shard)]
    b = plan.batch_size
    return [Run(int(s), offset + int(a) // b, offset + (int(z) - 1) // b) for s, a, z in zip(shard, start, stop)]


@dataclass
class NodePlan:
    """Every local rank's runs on one clock, and this process's own runs (its reading order)."""

    own: list[Run]  # this epoch's runs of this process's rank: one cache occurrence each
    own_next: list[Run]  # the next epoch's, on the same clock (after `own`'s last batch)
    uses: dict[int, list[Run]] = field(default_factory=dict)  # shard -> every local rank's runs of it

    @classmethod
    def of_ranks(cls, this: list[EpochPlan], after: list[EpochPlan], own: int) -> NodePlan:
        """`this`: each local rank's plan for the rest of this epoch; `after`: for the next epoch
        (empty: not known); `own`: this process's position in both lists."""
        horizon = max((p.batches for p in this), default=0)
        node = cls(_runs(this[own], 0), _runs(after[own], horizon) if after else [])
        for plans, offset in ((this, 0), (after, horizon)):
            for p in plans:
                for run in _runs(p, offset):
                    node.uses.setdefault(run.shard, []).append(run)
        for runs in node.uses.values():
            runs.sort(key=lambda r: r.first)
        return node

    @classmethod
    def single(cls, sequence: list[int]) -> NodePlan:
        """Only this reader's occurrences, one per time step (a cache used without a loader)."""
        node = cls([Run(s, j, j) for j, s in enumerate(sequence)], [])
        for run in node.own:
            node.uses.setdefault(run.shard, []).append(run)
        return node

    @property
    def sequence(self) -> list[int]:
        return [r.shard for r in self.own]

    def next_use(self, shard: int, now: int) -> float:
        """Batches from `now` until some local rank reads `shard` (0: being read); NEVER if none will."""
        best = NEVER
        for run in self.uses.get(shard, ()):
            if run.last >= now:
                best = min(best, max(0, run.first - now))
                if run.first >= now:
                    break  # sorted by first: the later ones start later still
        return best


def smallest_limit(largest: int, ranks: int, held: int) -> int:
    """The least cache_limit with which every local rank can hold the shard it reads: one largest
    shard per local rank, plus what is never evicted (the indexes). Shards in flight come on top
    (at most IN_FLIGHT_EXCESS of the largest), so a straddling batch or a miss can still land."""
    return held + largest * max(1, ranks)
