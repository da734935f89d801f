"""Which samples each rank reads in one epoch, in which order: one plan for every backend.

The order is decided here, in numpy, from (seed, epoch) alone, so it is the same on every rank
(no communication), the same for both backends, and a resume can cut it at any batch:

1. permute the shards; permute the samples inside each shard; concatenate. (Shards were
   shuffled across the whole split when written, so this mixes classes like a global
   shuffle while each rank keeps reading a few shards sequentially.)
2. cut the sequence into `world_size` contiguous parts whose sizes differ by at most one.
3. drop_last: every rank keeps floor(N / world / batch) batches. Otherwise every rank gets
   ceil(ceil(N / world) / batch) batches, its part padded by repeating its own samples;
   padding rows come last and are flagged invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochPlan:
    """One rank's rows for one epoch: rows [b * batch_size, (b + 1) * batch_size) form batch b."""

    shard: np.ndarray  # int32, shard number (position in the loader's shard list) per row
    sample: np.ndarray  # int32, sample number inside that shard
    valid: np.ndarray  # bool, False on padding rows
    batch_size: int

    @property
    def batches(self) -> int:
        return len(self.shard) // self.batch_size

    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Maximal stretches of rows reading the same shard: (their shard, their first row) per run."""
        starts = np.flatnonzero(np.diff(self.shard)) + 1 if len(self.shard) else np.zeros(0, np.int64)
        starts = np.concatenate([[0], starts]).astype(np.int64) if len(self.shard) else starts
        return self.shard[starts], starts

    def from_batch(self, b: int) -> EpochPlan:
        r = b * self.batch_size
        return EpochPlan(self.shard[r:], self.sample[r:], self.valid[r:], self.batch_size)


def num_batches(total: int, *, batch_size: int, world_size: int, drop_last: bool) -> int:
    if drop_last:
        return total // world_size // batch_size
    per_rank = -(-total // world_size)  # ceil
    return -(-per_rank // batch_size)


def global_order(counts: list[int], seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sample once, in epoch `epoch`'s order: (shard numbers, sample numbers)."""
    rng = np.random.default_rng([seed, epoch])
    shards, samples = [], []
    for s in rng.permutation(len(counts)):
        shards.append(np.full(counts[s], s, np.int32))
        samples.append(rng.permutation(counts[s]).astype(np.int32))
    return np.concatenate(shards), np.concatenate(samples)


def plan_epoch(
    counts: list[int], *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, drop_last: bool
) -> EpochPlan:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    total = sum(counts)
    batches = num_batches(total, batch_size=batch_size, world_size=world_size, drop_last=drop_last)
    if batches == 0:
        raise ValueError(
            f"{total} samples give no full batch of {batch_size} on each of {world_size} ranks with drop_last=True; "
            "use a smaller batch or drop_last=False"
        )
    shard, sample = global_order(counts, seed, epoch)
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    rows = batches * batch_size
    if drop_last:
        sl = slice(start, start + rows)
        return EpochPlan(shard[sl], sample[sl], np.ones(rows, bool), batch_size)
    # Pad with this rank's own samples (so a rank reads nothing extra), or with the global
    # sequence when the rank has none (more ranks than samples).
    part = np.arange(start, stop) if stop > start else np.arange(total)
    pick = np.resize(part, rows)
    valid = np.zeros(rows, bool)
    valid[: stop - start] = True
    return EpochPlan(shard[pick], sample[pick], valid, batch_size)
