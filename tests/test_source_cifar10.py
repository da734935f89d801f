"""The CIFAR-10 source: official archive layout, lossless PNG or JPEG, labels, bad archives."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from cifar_fixture import LABEL_NAMES, TRAIN_BATCHES, batch_images, batch_labels, make_cifar_tarball
from PIL import Image

from shards.build import build
from shards.images import pack
from shards.sources import open_source
from shards.sources.cifar10 import ARCHIVE, Cifar10Error, Cifar10Source
from shards.types import Options

PER_BATCH = 3


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    return make_cifar_tarball(tmp_path_factory.mktemp("cifar") / ARCHIVE, per_batch=PER_BATCH)


def _expected(split: str) -> tuple[np.ndarray, list[int]]:
    batches = TRAIN_BATCHES if split == "train" else ["test_batch"]
    rows = np.concatenate([batch_images(b, PER_BATCH) for b in batches])
    labels = [lab for b in batches for lab in batch_labels(b, PER_BATCH)]
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def test_classes_splits_items_and_pixels(tarball):
    src = open_source("cifar10", str(tarball.parent))  # a folder holding the archive works too
    assert [c.id for c in src.classes()] == LABEL_NAMES == sorted(LABEL_NAMES)
    assert [c.index for c in src.classes()] == list(range(10))
    assert src.splits() == ["train", "val"]
    for split, n in (("train", 5 * PER_BATCH), ("val", PER_BATCH)):
        items = src.items(split)
        images, labels = _expected(split)
        assert len(items) == n
        assert [it.key for it in items] == [f"cifar10_{split}_{i:05d}" for i in range(n)]
        assert [it.label for it in items] == labels
        assert [it.class_id for it in items] == [LABEL_NAMES[lab] for lab in labels]
        for it, pixels in zip(items, images):
            data = src.read(it)
            assert data.startswith(b"\x89PNG")
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), pixels)
    assert src.items("train")[PER_BATCH].source == "cifar-10-batches-py/data_batch_2#0"
    assert src.quarantined("train") == []


def test_png_passes_pack_unchanged_and_jpeg_is_high_quality(tarball):
    src = Cifar10Source(str(tarball))
    item = src.items("val")[0]
    png = src.read(item)
    packed = pack(png, keep_png=True)
    assert (packed.data, packed.ext, packed.repaired) == (png, "png", None)
    assert src.read(item) == png  # deterministic bytes

    jpg_src = Cifar10Source(str(tarball), image_ext="jpg", jpeg_quality=95)
    jpg = jpg_src.read(item)
    assert jpg.startswith(b"\xff\xd8\xff")
    assert pack(jpg).data == jpg
    # Noise images are the worst case for JPEG; at q95 4:4:4 the error still stays small.
    err = np.abs(np.asarray(Image.open(io.BytesIO(jpg)), np.int16) - _expected("val")[0][0].astype(np.int16))
    assert err.mean() < 12


def test_source_pickles_small_and_reloads_lazily(tarball):
    src = Cifar10Source(str(tarball))
    src.items("train")  # loads the arrays in this process
    blob = pickle.dumps(src)
    assert len(blob) < 1000  # path and options only: workers load the arrays themselves
    again = pickle.loads(blob)
    assert again.read(again.items("train")[4]) == src.read(src.items("train")[4])


def _read_back(out: Path, manifest: dict, split: str) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            names = tf.getnames()
            assert len(names) == 4 * shard["samples"]
        for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False):
            samples[s["__key__"]] = s
    return samples


def test_build_png_shards_read_back_and_are_reproducible(tarball, tmp_path):
    src = Cifar10Source(str(tarball))
    opts = Options(seed=3, shard_samples=4, image_ext=src.image_ext)
    m = build(src, str(tmp_path / "a"), opts, workers=1)
    assert m["dataset"] == "cifar10" and m["image_ext"] == "png"
    assert [c["id"] for c in m["classes"]] == LABEL_NAMES
    assert m["splits"]["train"]["samples"] == 5 * PER_BATCH
    assert m["splits"]["train"]["pattern"] == "cifar10-train-{000..003}.tar"
    assert m["quarantine"] == []
    images, labels = _expected("train")
    got = _read_back(tmp_path / "a", m, "train")
    assert len(got) == 5 * PER_BATCH
    for i in range(5 * PER_BATCH):
        s = got[f"cifar10_train_{i:05d}"]
        assert int(s["cls"]) == labels[i]
        assert json.loads(s["json"])["class"] == LABEL_NAMES[labels[i]]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), images[i])

    m2 = build(Cifar10Source(str(tarball)), str(tmp_path / "b"), opts, workers=2)  # spawned workers
    for shard in m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]:
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()
    assert m2["splits"] == m["splits"]


def test_build_jpeg_shards(tarball, tmp_path):
    src = Cifar10Source(str(tarball), image_ext="jpg")
    m = build(src, str(tmp_path), Options(seed=0, image_ext=src.image_ext), splits=["val"], workers=1)
    assert m["image_ext"] == "jpg" and list(m["splits"]) == ["val"]
    got = _read_back(tmp_path, m, "val")
    assert {k: int(s["cls"]) for k, s in got.items()} == {
        f"cifar10_val_{i:05d}": lab for i, lab in enumerate(_expected("val")[1])
    }
    assert all("jpg" in s and json.loads(s["json"])["repaired"] is None for s in got.values())


def _rewrite(src: Path, dest: Path, change) -> Path:
    """Copy the fixture archive with `change(name, data) -> data | None` applied to each member."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w:gz") as tout:
        for info in tin:
            data = tin.extractfile(info).read()
            data = change(info.name.rsplit("/", 1)[-1], data)
            if data is not None:
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    return dest


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p, t: t / "nope.tar.gz", "does not exist"),
        (lambda p, t: t, "holds neither"),
        (lambda p, t: _write(t / ARCHIVE, b""), "not a readable tar.gz"),
        (lambda p, t: _write(t / ARCHIVE, p.read_bytes()[:2000]), "not a readable tar.gz"),
        (lambda p, t: _write(t / ARCHIVE, gzip.compress(b"junk" * 300)), "not a readable"),
        (lambda p, t: _rewrite(p, t / ARCHIVE, lambda n, d: None if n == "data_batch_3" else d), "no data_batch_3"),
        (lambda p, t: _rewrite(p, t / ARCHIVE, lambda n, d: d[:50] if n == "test_batch" else d), "test_batch is not"),
        (
            lambda p, t: _rewrite(p, t / ARCHIVE, lambda n, d: pickle.dumps({"data": _Evil()}) if n == "test_batch" else d),
            "refusing to load",
        ),
        (
            lambda p, t: _rewrite(
                p, t / ARCHIVE, lambda n, d: pickle.dumps({"label_names": LABEL_NAMES[::-1]}) if n == "batches.meta" else d
            ),
            "label_names",
        ),
        (
            lambda p, t: _rewrite(
                p,
                t / ARCHIVE,
                lambda n, d: pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]})
                if n == "data_batch_1"
                else d,
            ),
            "label outside",
        ),
        (
            lambda p, t: _rewrite(
                p,
                t / ARCHIVE,
                lambda n, d: pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
                if n == "data_batch_1"
                else d,
            ),
            "N x 3072",
        ),
    ],
    ids=["missing", "empty-folder", "empty-file", "truncated", "not-a-tar", "no-batch", "bad-pickle", "code-in-pickle",
         "wrong-labels", "label-range", "bad-shape"],
)  # fmt: skip
def test_bad_archives_give_one_line_errors(tarball, tmp_path, capsys, make, message):
    path = make(tarball, tmp_path)
    with pytest.raises(Cifar10Error) as e:
        src = Cifar10Source(str(path))
        src.items("train")
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert "pwned" not in capsys.readouterr().out


def test_bad_options_are_refused(tarball):
    with pytest.raises(Cifar10Error, match="png or jpg"):
        Cifar10Source(str(tarball), image_ext="webp")
    with pytest.raises(Cifar10Error, match=r"1\.\.100"):
        Cifar10Source(str(tarball), jpeg_quality=0)
    with pytest.raises(Cifar10Error, match="needs --source"):
        open_source("cifar10", None)


def test_an_explicit_md5_of_the_local_archive_is_checked(tarball):
    from shards.checksums import ChecksumError, md5_file

    Cifar10Source(str(tarball), md5={ARCHIVE: md5_file(tarball, progress=False)})
    with pytest.raises(ChecksumError, match=f"{ARCHIVE}: expected {'0' * 32}"):
        Cifar10Source(str(tarball), md5={ARCHIVE: "0" * 32})
