"""loaders/mix.py: the joint class list and the mixed epoch order of several sets, as plain numbers."""

from __future__ import annotations

import numpy as np
import pytest

from loaders import mix


def _classes(*ids: str) -> list[dict]:
    return [{"index": i, "id": c, "name": c.upper()} for i, c in enumerate(ids)]


def test_joint_labels_by_class_id_first_set_keeps_its_labels():
    joint, (a, b) = mix.joint_classes([_classes("cat", "dog", "owl"), _classes("eel", "dog", "cat", "ant")])
    assert [c["id"] for c in joint] == ["cat", "dog", "owl", "eel", "ant"]
    assert [c["index"] for c in joint] == [0, 1, 2, 3, 4]
    assert a.tolist() == [0, 1, 2]  # the first set's labels unchanged
    assert b.tolist() == [3, 1, 0, 4]  # shared classes are one class; new ones appended in b's order


def test_shares_follow_the_weights_and_sum_to_the_epoch():
    assert mix.shares([3, 1], 1000) == [750, 250]
    assert mix.shares([1, 1, 1], 10) == [4, 3, 3]
    assert sum(mix.shares([0.2, 0.3, 0.5], 12_345)) == 12_345
    with pytest.raises(ValueError, match="weights"):
        mix.shares([0, 0], 10)


SMALL, LARGE = [7, 5, 8], [100, 90, 110, 100]  # 20 and 400 samples


def _epoch(epoch: int, shares=(300, 120), seed: int = 4):
    return mix.mixed_order([SMALL, LARGE], list(shares), seed=seed, epoch=epoch)


def test_each_set_gives_its_weights_share_of_the_epoch():
    shard, _ = _epoch(0, mix.shares([3, 1], 420))
    small = int((shard < len(SMALL)).sum())
    assert abs(small / len(shard) - 0.75) < 0.01 and len(shard) == 420
    # the sets are interleaved, not one after the other: every tenth of the epoch draws from both
    for part in np.array_split(shard, 10):
        assert (part < len(SMALL)).any() and (part >= len(SMALL)).any()


def test_the_order_is_a_function_of_seed_and_epoch():
    a, b = _epoch(2), _epoch(2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(_epoch(3)[1], a[1]) and not np.array_equal(_epoch(2, seed=5)[1], a[1])


def _samples_of(shard, sample, lo: int, counts: list[int]) -> list[tuple[int, int]]:
    keep = (shard >= lo) & (shard < lo + len(counts))
    return list(zip((shard[keep] - lo).tolist(), sample[keep].tolist(), strict=True))


def test_a_small_set_repeats_each_pass_in_a_new_order():
    shard, sample = _epoch(0)
    drawn = _samples_of(shard, sample, 0, SMALL)  # 300 draws from 20 samples: 15 passes
    assert len(drawn) == 300
    passes = [drawn[i : i + 20] for i in range(0, 300, 20)]
    every = {(s, i) for s, n in enumerate(SMALL) for i in range(n)}
    assert all(set(p) == every for p in passes)  # each pass reads every sample once
    assert len({tuple(p) for p in passes}) == len(passes)  # and in its own order


def test_a_large_set_gives_another_subset_each_epoch_and_all_of_itself_over_epochs():
    lo = len(SMALL)
    seen = [set(_samples_of(*_epoch(e), lo, LARGE)) for e in range(4)]  # 120 of 400 an epoch
    assert all(len(s) == 120 for s in seen[:3])
    assert not seen[0] & seen[1] and not seen[1] & seen[2]  # consecutive epochs: different subsets
    assert len(seen[0] | seen[1] | seen[2] | seen[3]) == 400  # 4 epochs x 120 >= 400: all of it
