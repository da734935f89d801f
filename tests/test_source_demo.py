"""The demo set: reproducible from its seed, balanced, class not given away by trivial cues, builds into shards."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.build import build
from shards.sources import open_source
from shards.sources.demo import CLASSES, DemoError, DemoSource, render
from shards.types import Options


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


def test_classes_splits_and_items():
    src = open_source("demo", None, seed=3, train_per_class=4, val_per_class=2)
    assert [(c.index, c.id, c.name) for c in src.classes()] == [(i, c, c) for i, c in enumerate(sorted(CLASSES))]
    assert src.splits() == ["train", "val"]
    train, val = src.items("train"), src.items("val")
    assert (len(train), len(val)) == (40, 20)
    assert train[3].key == "demo_train_000003" and val[7].key == "demo_val_000007"
    assert Counter(it.label for it in train) == {i: 4 for i in range(10)}
    assert all(CLASSES[it.label] == it.class_id and it.class_id in it.source for it in train + val)
    assert src.quarantined("train") == [] == src.quarantined("val")


def test_images_are_reproducible_from_the_seed():
    a, b = DemoSource(seed=7, train_per_class=2), DemoSource(seed=7, train_per_class=2)
    other_seed = DemoSource(seed=8, train_per_class=2)
    items = a.items("train")
    first = [a.read(it) for it in items]
    assert first == [b.read(it) for it in reversed(items)][::-1]  # order of reads does not matter
    assert all(x != y for x, y in zip(first, (other_seed.read(it) for it in items)))
    assert len(set(first)) == len(first)
    val0 = a.read(a.items("val")[0])
    assert val0 != first[0]  # the splits draw different images
    img = Image.open(io.BytesIO(first[0]))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (96, 96))
    assert DemoSource(size=64).read(DemoSource(size=64).items("val")[3]).startswith(b"\xff\xd8\xff")
    assert Image.open(io.BytesIO(DemoSource(size=64).read(DemoSource(size=64).items("val")[3]))).size == (64, 64)


def test_the_class_changes_the_object_not_the_scene():
    # Same seed, split and index: background and clutter are drawn alike, only the object differs.
    images = [np.asarray(render(0, "train", 5, label), np.float32) for label in range(len(CLASSES))]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            changed = np.abs(images[i] - images[j]).max(axis=2) > 40
            assert 0.02 < changed.mean() < 0.6, (CLASSES[i], CLASSES[j], changed.mean())


def test_mean_colour_does_not_give_the_class_away():
    # A nearest-centroid classifier on mean colour and brightness spread stays near chance.
    src = DemoSource(seed=1, train_per_class=30, val_per_class=20)

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        items = src.items(split)
        x = []
        for it in items:
            p = _pixels(src.read(it))
            x.append([*p.mean((0, 1)), p.std()])
        return np.array(x), np.array([it.label for it in items])

    xtr, ytr = features("train")
    xva, yva = features("val")
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(10)])
    pred = np.argmin(((xva[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == yva).mean() < 0.25  # chance is 0.10


def _read_shards(out, manifest: dict, split: str) -> list[dict]:
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            assert len(tf.getmembers()) == 4 * shard["samples"]
        samples += list(wds.WebDataset(str(out / shard["name"]), shardshuffle=False))
    return samples


def test_build_reads_back_and_is_byte_identical(tmp_path):
    src = DemoSource(seed=4, train_per_class=3, val_per_class=1)
    opts = Options(seed=4, shard_samples=8)
    m = build(src, str(tmp_path / "a"), opts, workers=2)
    m2 = build(DemoSource(seed=4, train_per_class=3, val_per_class=1), str(tmp_path / "b"), opts, workers=1)
    assert m["dataset"] == "demo" and m["image_ext"] == "jpg" and m["quarantine"] == []
    assert m["splits"]["train"]["pattern"] == "demo-train-{000..003}.tar"
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (30, 10)
    assert m2["splits"] == m["splits"]
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()
        samples = _read_shards(tmp_path / "a", m, split)
        by_key = {it.key: it for it in src.items(split)}
        assert sorted(s["__key__"] for s in samples) == sorted(by_key)
        for s in samples:
            item = by_key[s["__key__"]]
            meta = json.loads(s["json"])
            assert int(s["cls"]) == item.label and meta["class"] == CLASSES[item.label]
            assert s["jpg"] == src.read(item)  # stored as rendered, not re-encoded
            assert (meta["width"], meta["height"], meta["repaired"]) == (96, 96, None)
    # Shuffled across the split: the first shard mixes classes.
    first = _read_shards(tmp_path / "a", {"splits": {"t": {"shards": m["splits"]["train"]["shards"][:1]}}}, "t")
    assert len({int(s["cls"]) for s in first}) >= 4


@pytest.mark.parametrize(
    "kwargs, message",
    [({"train_per_class": 0}, "must be >= 1"), ({"val_per_class": -1}, "must be >= 1"), ({"size": 8}, "at least 16")],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(DemoError, match=message):
        DemoSource(**kwargs)
