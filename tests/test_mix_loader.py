"""make_loader over several sets: joint labels by class id, each set's share, exact and elastic
resume, and both backends the same, on real shards (tests/helpers.py's photos)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from helpers import PHOTOS, PhotoSource

from loaders import make_loader
from shards.build import build
from shards.types import ClassInfo, Options


class ReversedClasses(PhotoSource):
    """The photos with `num_classes` classes listed backwards: label i is class c{n-1-i}."""

    def classes(self) -> list[ClassInfo]:
        n = self.num_classes
        return [ClassInfo(i, f"c{n - 1 - i}", f"class {n - 1 - i}") for i in range(n)]


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> tuple[str, str]:
    a, b = tmp_path_factory.mktemp("set-a"), tmp_path_factory.mktemp("set-b")
    build(PhotoSource(num_classes=4, copies=2), str(a), Options(seed=1, shard_samples=7), workers=1)  # 48
    build(ReversedClasses(num_classes=6, copies=1), str(b), Options(seed=2, shard_samples=5), workers=1)  # 24
    return str(a), str(b)


def true_label(ld, shard: int, sample: int) -> int:
    """The joint label a row must carry, from its key: photo i is label i % n of its own set."""
    photo = [p.stem for p in PHOTOS].index(ld.shards[shard].key(sample).split("_", 2)[2])
    in_a = shard < len(ld.mix.set_counts[0])
    class_id = f"c{photo % 4}" if in_a else f"c{6 - 1 - photo % 6}"
    return [c["id"] for c in ld.classes].index(class_id)


def kw(**more):
    return dict(batch_size=8, train=True, image_size=32, workers=0, seed=3) | more


def test_joint_classes_by_id_and_labels_remapped(two_sets):
    a, b = two_sets
    ld = make_loader({a: 3, b: 1}, backend="pytorch", **kw())
    assert [c["id"] for c in ld.classes] == ["c0", "c1", "c2", "c3", "c5", "c4"] and ld.num_classes == 6
    plan = ld.plan()
    for bno, (_, labels) in enumerate(ld):
        rows = slice(bno * 8, (bno + 1) * 8)
        want = [true_label(ld, s, i) for s, i in zip(plan.shard[rows], plan.sample[rows], strict=True)]
        assert labels.tolist() == want


def test_each_set_gives_its_weights_share_of_the_epoch(two_sets):
    a, b = two_sets
    ld = make_loader({a: 3, b: 1}, backend="pytorch", drop_last=False, epoch_size=400, **kw())
    assert ld.num_samples == 400
    in_a = (ld.plan().shard < len(ld.mix.set_counts[0]))[ld.plan().valid]
    assert abs(in_a.mean() - 0.75) < 0.01
    # a list of sets weighs them by size: plain concatenation, every sample once
    both = make_loader([a, b], backend="pytorch", drop_last=False, **kw())
    plan = both.plan()
    assert both.num_samples == 72 and len(set(zip(plan.shard.tolist(), plan.sample.tolist()))) == 72


def _rows(plans, batches: int | None = None) -> Counter:
    """(shard, sample) -> times read, over the valid rows of plans (their first `batches` batches)."""
    out = Counter()
    for p in plans:
        n = len(p.shard) if batches is None else batches * p.batch_size
        out.update(zip(p.shard[:n][p.valid[:n]].tolist(), p.sample[:n][p.valid[:n]].tolist(), strict=True))
    return out


def test_exact_and_elastic_resume_on_a_mix(two_sets):
    a, b = two_sets
    sets = {a: 1, b: 2}
    full = [make_loader(sets, backend="pytorch", rank=r, world_size=2, **kw()) for r in range(2)]
    for ld in full:
        ld.set_epoch(1)
    whole = _rows([ld.plan() for ld in full])
    # two ranks read 2 batches each, then the rest goes on at one rank (elastic) and at two (exact)
    states = []
    for ld in full:
        it = iter(ld.with_valid())
        next(it), next(it)
        states.append(ld.state_dict())
    one = make_loader(sets, backend="pytorch", **kw())
    one.load_state_dict(states[0])
    read = _rows([ld.plan() for ld in full], batches=2)
    assert read + _rows([one.plan()]) == whole  # every row of the epoch once, none twice
    again = make_loader(sets, backend="pytorch", rank=1, world_size=2, **kw())
    again.load_state_dict(states[1])  # the same shape: exactly where rank 1 stood, labels included
    rest = list(again)
    assert len(rest) == len(full[1]) - 2
    plan = full[1].plan().from_batch(2)
    want = [true_label(again, s, i) for s, i in zip(plan.shard.tolist(), plan.sample.tolist(), strict=True)]
    assert torch.cat([y for _, y in rest]).tolist() == want


def test_both_backends_give_the_same_labels_and_rows(two_sets):
    pytest.importorskip("nvidia.dali")
    a, b = two_sets
    got = {}
    for backend in ("pytorch", "dali"):
        ld = make_loader({a: 1, b: 1}, backend=backend, **kw(train=False, drop_last=False, workers=1))
        got[backend] = (torch.cat([y for _, y in ld]), ld.plan())
    assert torch.equal(got["pytorch"][0], got["dali"][0])
    assert np.array_equal(got["pytorch"][1].sample, got["dali"][1].sample)


def test_a_remote_set_in_a_mix_is_refused_in_one_line(two_sets, tmp_path):
    """Not yet: the shard cache serves one set (two sets' shards can share file names)."""
    import s3fs
    from s3_server import moto_s3

    a, b = two_sets
    with moto_s3() as endpoint:
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).put(b + "/", "team-data/b/", recursive=True)
        with pytest.raises(ValueError, match="s3://team-data/b: several sets in one stream are read from local"):
            make_loader({a: 1, "s3://team-data/b": 1}, backend="pytorch", cache_dir=tmp_path / "cache", **kw())
