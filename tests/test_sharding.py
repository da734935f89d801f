"""loaders/sharding.py's elastic-resume arithmetic, as pure functions: every sample once, equal len."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from loaders.sharding import (
    STATE_VERSION,
    Position,
    check_state,
    epoch_rows,
    fraction_read,
    plan_epoch,
    plan_rest,
    rebase,
    unread,
)

COUNTS = [7, 7, 7, 3, 5]  # 29 samples in uneven shards
TOTAL = sum(COUNTS)


def plans(pos: Position, world: int, batch: int, drop_last: bool, epoch: int = 3):
    """Every rank's plan at `pos`, from its first row, and the batch number of that row."""
    if pos.segments is None:
        kw = dict(batch_size=batch, world_size=world, seed=0, epoch=epoch, drop_last=drop_last)
        return [plan_epoch(COUNTS, rank=r, **kw) for r in range(world)]
    kw = dict(batch_size=batch, world_size=world, seed=0, epoch=epoch)
    return [plan_rest(COUNTS, pos.segments, rank=r, **kw) for r in range(world)]


def read(pos: Position, world: int, batch: int, drop_last: bool, batches: int | None) -> tuple[list, Position]:
    """Read `batches` batches (None: to the end) on every rank; the valid rows read and the new position."""
    ps = plans(pos, world, batch, drop_last)
    assert len({p.batches for p in ps}) == 1, "equal len on every rank"
    first = pos.batches - pos.offset
    stop = ps[0].batches if batches is None else min(first + batches, ps[0].batches)
    rows = []
    for p in ps:
        assert not np.any(np.diff(p.valid.astype(int)) > 0), "padding rows come last"
        sl = slice(first * batch, stop * batch)
        rows += [(s, i) for s, i, v in zip(p.shard[sl], p.sample[sl], p.valid[sl], strict=True) if v]
    return rows, Position(pos.offset + stop, pos.segments, pos.offset, pos.epoch_samples)


def state_of(pos: Position, world: int, batch: int, drop_last: bool, rank: int = 0) -> dict:
    return {
        "version": STATE_VERSION,
        "epoch": 3,
        "batches": pos.batches,
        "world_size": world,
        "rank": rank,
        "batch_size": batch,
        "drop_last": drop_last,
        "segments": None if pos.segments is None else [list(s) for s in pos.segments],
        "offset": pos.offset,
        "epoch_samples": pos.epoch_samples,
    }


SHAPES = [(1, 4), (2, 3), (3, 2), (4, 1), (5, 2)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_any_chain_of_shapes_reads_the_epoch_once(drop_last):
    # Every pair of shapes and every batch boundary of the first: the rows read before the
    # change plus those read after cover the epoch's samples exactly once.
    for (w0, b0), (w1, b1), (w2, b2) in itertools.product(SHAPES, SHAPES, [(1, 3), (3, 1)]):
        normal = plans(Position(), w0, b0, drop_last)
        want = sorted((int(s), int(i)) for p in normal for s, i, v in zip(p.shard, p.sample, p.valid, strict=True) if v)
        for k in range(normal[0].batches + 1):
            got, pos = read(Position(), w0, b0, drop_last, k)
            state = state_of(pos, w0, b0, drop_last, rank=w0 - 1)  # any rank's state will do
            pos = rebase(state, total=TOTAL, world_size=w1, batch_size=b1, drop_last=drop_last)
            more, pos = read(pos, w1, b1, drop_last, 1)  # one batch at the second shape, then a third
            got += more
            pos = rebase(
                state_of(pos, w1, b1, drop_last), total=TOTAL, world_size=w2, batch_size=b2, drop_last=drop_last
            )
            rest, _ = read(pos, w2, b2, drop_last, None)
            got += rest
            if k == 0 and (w0, b0) != (w1, b1):
                continue  # a state at batch 0 starts the new shape's normal plan: another sample set
            assert sorted((int(s), int(i)) for s, i in got) == want, ((w0, b0), (w1, b1), (w2, b2), k)


def test_same_shape_resume_is_the_same_plan_at_the_same_batch():
    pos = Position(2)
    assert rebase(state_of(pos, 3, 2, True), total=TOTAL, world_size=3, batch_size=2, drop_last=True) == Position(
        2, None, 0, 24
    )


def test_unread_and_fraction():
    # 29 rows on 2 ranks of batch 3, no drop: parts [0, 15) and [15, 29); two batches read.
    rest = unread(TOTAL, segments=None, world_size=2, batch_size=3, batches=2, drop_last=False)
    assert rest == ((6, 15), (21, 29))
    # drop_last: 4 batches of 3 per rank read [0, 12) and [15, 27); the tails are not "to read".
    assert unread(TOTAL, segments=None, world_size=2, batch_size=3, batches=1, drop_last=True) == ((3, 12), (18, 27))
    assert epoch_rows(TOTAL, batch_size=3, world_size=2, drop_last=True) == 24
    pos = Position(2)
    assert fraction_read(pos, total=TOTAL, world_size=2, batch_size=3, drop_last=False) == pytest.approx(12 / 29)
    new = rebase(state_of(pos, 2, 3, False), total=TOTAL, world_size=3, batch_size=2, drop_last=False)
    assert new.segments == rest and new.offset == 12 // 6 and new.batches == new.offset
    assert fraction_read(new, total=TOTAL, world_size=3, batch_size=2, drop_last=False) == pytest.approx(12 / 29)


def test_rest_pads_short_parts_and_nothing_left_gives_no_batches():
    ps = [plan_rest(COUNTS, ((4, 6),), batch_size=2, rank=r, world_size=3, seed=0, epoch=0) for r in range(3)]
    assert [p.batches for p in ps] == [1, 1, 1]
    assert [p.valid.tolist() for p in ps] == [[True, False], [True, False], [False, False]]
    empty = plan_rest(COUNTS, (), batch_size=2, rank=0, world_size=2, seed=0, epoch=0)
    assert empty.batches == 0


def test_state_versions():
    assert check_state({"epoch": 0, "batches": 0}) == 1  # written before versions
    with pytest.raises(ValueError, match="format version 3"):
        check_state({"epoch": 0, "batches": 0, "version": 3})
    with pytest.raises(ValueError, match="not a loader state"):
        check_state({"model": {}})
