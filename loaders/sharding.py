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

Resume at another world size or per-rank batch size (elastic): positions in the epoch's
global order are what a loader state names. A state taken at a batch boundary says which
positions every rank had still to read (`unread`); the new ranks cut those, in order, into
near-equal contiguous parts padded to equal batches (`plan_rest`), so together they read each
of them once. The epoch after that is the normal plan for the new world size. Every function
here is pure: the loaders (and the tests) call them with plain numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# epoch -> (shard numbers, sample numbers): an epoch's global order other than global_order's
# (several sets in one stream: loaders/mix.py). Its length is the epoch's sample count.
Order = Callable[[int], tuple[np.ndarray, np.ndarray]]


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


def rank_span(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's part when `total` rows are cut into near-equal contiguous parts."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def epoch_order(counts: list[int], seed: int, epoch: int, order: Order | None) -> tuple[np.ndarray, np.ndarray]:
    return global_order(counts, seed, epoch) if order is None else order(epoch)


def plan_epoch(
    counts: list[int],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    drop_last: bool,
    order: Order | None = None,
) -> EpochPlan:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    shard, sample = epoch_order(counts, seed, epoch, order)
    total = len(shard)
    batches = num_batches(total, batch_size=batch_size, world_size=world_size, drop_last=drop_last)
    if batches == 0:
        raise ValueError(
            f"{total} samples give no full batch of {batch_size} on each of {world_size} ranks with drop_last=True; "
            "use a smaller batch or drop_last=False"
        )
    start, stop = rank_span(total, rank, world_size)
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


# -- elastic resume: the rest of an epoch, on any world size ----------------------------------------

Segments = tuple[tuple[int, int], ...]  # [lo, hi) ranges of positions in the epoch's global order, in order


def epoch_rows(total: int, *, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Real (not padding) rows a normal epoch reads, all ranks together."""
    if drop_last:
        return (
            world_size * num_batches(total, batch_size=batch_size, world_size=world_size, drop_last=True) * batch_size
        )
    return total


def segments_length(segments: Segments) -> int:
    return sum(hi - lo for lo, hi in segments)


def rest_batches(length: int, *, batch_size: int, world_size: int) -> int:
    """Batches per rank of a plan over `length` remaining positions: every one read, padded to equal len."""
    per_rank = -(-length // world_size)  # ceil
    return -(-per_rank // batch_size)


def _positions(segments: Segments) -> np.ndarray:
    if not segments:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in segments])


def _to_segments(positions: np.ndarray) -> Segments:
    """Sorted-as-given positions -> maximal runs of consecutive positions."""
    if len(positions) == 0:
        return ()
    cut = np.flatnonzero(np.diff(positions) != 1) + 1
    runs = np.split(positions, cut)
    return tuple((int(r[0]), int(r[-1]) + 1) for r in runs)


def unread(
    total: int, *, segments: Segments | None, world_size: int, batch_size: int, batches: int, drop_last: bool
) -> Segments:
    """Positions still to read after every rank yielded `batches` batches of a plan.

    segments None: the normal plan of the epoch (a drop_last plan never reads the tail of each
    rank's part, so that tail is not "still to read"). Otherwise the plan `plan_rest` cuts from
    those segments. Padding rows are not positions: a rank that has read into its padding has
    nothing left.
    """
    if segments is None:
        order = np.arange(total, dtype=np.int64)
        per_rank = num_batches(total, batch_size=batch_size, world_size=world_size, drop_last=drop_last)
        keep_only = per_rank * batch_size if drop_last else None
    else:
        order = _positions(segments)
        keep_only = None
    left = []
    for r in range(world_size):
        start, stop = rank_span(len(order), r, world_size)
        if keep_only is not None:
            stop = min(stop, start + keep_only)
        left.append(order[min(start + batches * batch_size, stop) : stop])
    return _to_segments(np.concatenate(left))


def plan_rest(
    counts: list[int],
    segments: Segments,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    order: Order | None = None,
) -> EpochPlan:
    """This rank's rows for the rest of an epoch: its near-equal contiguous part of `segments`.

    Every rank gets rest_batches(...) batches; a part short of them is padded by repeating its
    own rows (or the whole rest, when it has none), padding flagged invalid and last. Nothing
    left (empty segments): no batches.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    positions = _positions(segments)
    batches = rest_batches(len(positions), batch_size=batch_size, world_size=world_size)
    rows = batches * batch_size
    shard, sample = epoch_order(counts, seed, epoch, order)
    start, stop = rank_span(len(positions), rank, world_size)
    part = positions[start:stop] if stop > start else positions
    pick = np.resize(part, rows) if rows else part[:0]
    valid = np.zeros(rows, bool)
    valid[: stop - start] = True
    return EpochPlan(shard[pick], sample[pick], valid, batch_size)


# -- the loader state: its format, and what it means for a loader of another shape -----------------

STATE_FORMAT = "shardline-loader-state"
STATE_VERSION = 2  # 1: {epoch, batches, seed, world_size, rank, batch_size, num_samples}, same shape only


@dataclass(frozen=True)
class Position:
    """Where a loader stands in an epoch.

    segments None: the normal plan, `batches` batches of it yielded. Otherwise the rest of an
    epoch cut by plan_rest, of which `batches - offset` batches were yielded; `offset` counts
    the samples read before the cut as whole batches of this loader (so len() - batches is what
    is left, the same on every rank). epoch_samples: real rows the whole epoch reads.
    """

    batches: int = 0
    segments: Segments | None = None
    offset: int = 0
    epoch_samples: int | None = None


def check_state(state: dict) -> int:
    """The state's format version (1 for states written before versions); clear errors otherwise."""
    if not isinstance(state, dict) or "epoch" not in state or "batches" not in state:
        raise ValueError("not a loader state: expected a dict from Loader.state_dict() with 'epoch' and 'batches'")
    fmt = state.get("format", STATE_FORMAT)
    version = state.get("version", 1)
    if fmt != STATE_FORMAT:
        raise ValueError(f"not a loader state: format {fmt!r}, expected {STATE_FORMAT!r}")
    if version not in (1, STATE_VERSION):
        raise ValueError(
            f"loader state has format version {version!r}; this shardline reads versions 1..{STATE_VERSION} "
            "(a state from a newer shardline: upgrade this one)"
        )
    return version


def rebase(state: dict, *, total: int, world_size: int, batch_size: int, drop_last: bool) -> Position:
    """A state taken on any rank of any shape -> the position of a loader of this shape.

    Same world size, batch size and drop_last: the same plan at the same batch (exact resume).
    A state at the start of a normal epoch: the normal plan of this shape. Otherwise the
    positions not yet read become the segments of the rest of the epoch (elastic resume).
    """
    check_state(state)
    old_world, old_batch = int(state["world_size"]), int(state["batch_size"])
    old_drop = bool(state.get("drop_last", drop_last))
    batches = int(state["batches"])
    segments = state.get("segments")
    segments = None if segments is None else tuple((int(lo), int(hi)) for lo, hi in segments)
    offset = int(state.get("offset", 0))
    full = epoch_rows(total, batch_size=old_batch, world_size=old_world, drop_last=old_drop)
    epoch_samples = int(state.get("epoch_samples") or full)
    if (old_world, old_batch, old_drop) == (world_size, batch_size, drop_last):
        return Position(batches, segments, offset, epoch_samples)
    if segments is None and batches == 0:
        return Position()
    rest = unread(
        total,
        segments=segments,
        world_size=old_world,
        batch_size=old_batch,
        batches=batches - offset,
        drop_last=old_drop,
    )
    done = epoch_samples - segments_length(rest)
    new_offset = done // (world_size * batch_size)
    return Position(new_offset, rest, new_offset, epoch_samples)


def fraction_read(position: Position, *, total: int, world_size: int, batch_size: int, drop_last: bool) -> float:
    """Share of the epoch's samples read by all ranks together at `position` (0..1)."""
    epoch_samples = position.epoch_samples or epoch_rows(
        total, batch_size=batch_size, world_size=world_size, drop_last=drop_last
    )
    if not epoch_samples:
        return 0.0
    rest = unread(
        total,
        segments=position.segments,
        world_size=world_size,
        batch_size=batch_size,
        batches=position.batches - position.offset,
        drop_last=drop_last,
    )
    return 1 - segments_length(rest) / epoch_samples
