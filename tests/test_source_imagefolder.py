"""The image-folder source: layouts, labels, unique keys, the seeded val split and every bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.build import build
from shards.interop import reader_files
from shards.manifest import MANIFEST
from shards.sources import open_source
from shards.sources.imagefolder import ImageFolderError, ImageFolderSource
from shards.types import Options


def _image(path: Path, fmt: str = "JPEG", seed: int = 0, size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return path


def _tree(root: Path, layout: dict[str, int], seed: int = 0) -> None:
    """layout: 'class' -> number of JPEGs named img<i>.jpg."""
    for c, n in layout.items():
        for i in range(n):
            _image(root / c / f"img{i}.jpg", seed=seed + i + 100 * len(c))


def _by_source(src: ImageFolderSource, split: str) -> dict[str, tuple[str, int]]:
    return {it.source: (it.key, it.label) for it in src.items(split)}


def test_train_val_layout_labels_match_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    _tree(tmp_path / "train", {"zebra": 2, "ant": 3, "moth": 1})
    _tree(tmp_path / "val", {"zebra": 1, "ant": 1})
    _image(tmp_path / "train" / "moth" / "deep" / "er" / "x.PNG", "PNG")  # nested, upper-case extension
    (tmp_path / "train" / "moth" / "notes.txt").write_text("not an image, not listed")
    (tmp_path / "train" / "README").write_text("a file beside the class folders is ignored")
    src = open_source("imagefolder", str(tmp_path))
    assert src.splits() == ["train", "val"]
    assert [(c.index, c.id, c.name) for c in src.classes()] == [
        (0, "ant", "ant"),
        (1, "moth", "moth"),
        (2, "zebra", "zebra"),
    ]
    tv = ImageFolder(str(tmp_path / "train"))
    assert tv.class_to_idx == {c.id: c.index for c in src.classes()}
    want = {os.path.relpath(p, tmp_path): label for p, label in tv.samples}
    assert {s: lab for s, (_, lab) in _by_source(src, "train").items()} == want
    items = src.items("train")
    assert [it.source for it in items] == sorted(want)  # deterministic order
    # Stems unique in the split stay as they are; clashing ones take their class folder.
    assert {it.key for it in items} == {"img2", "x", "ant_img0", "ant_img1", "moth_img0", "zebra_img0", "zebra_img1"}
    x = next(it for it in items if it.key == "x")
    assert x.size == (tmp_path / x.source).stat().st_size and x.class_id == "moth"
    assert src.read(x) == (tmp_path / x.source).read_bytes()
    assert _by_source(src, "val") == {"val/ant/img0.jpg": ("ant_img0", 0), "val/zebra/img0.jpg": ("zebra_img0", 2)}


def test_colliding_stems_get_unique_deterministic_keys(tmp_path):
    _image(tmp_path / "cat" / "a.jpg")
    _image(tmp_path / "cat" / "a.png", "PNG")
    _image(tmp_path / "cat" / "sub" / "a.jpg")
    _image(tmp_path / "dog" / "a.jpg")
    _image(tmp_path / "dog" / "my photo.v2.JPEG")
    _image(tmp_path / "dog" / "cat_a.jpg")  # its stem equals another file's longer key
    keys = _by_source(ImageFolderSource(str(tmp_path)), "train")
    assert len({k for k, _ in keys.values()}) == len(keys) == 6
    assert keys["dog/my photo.v2.JPEG"][0] == "my_photo_v2"
    assert all(k.replace("_", "").replace("-", "").isalnum() for k, _ in keys.values())
    assert keys["cat/a.jpg"][0] != keys["cat/a.png"][0]
    assert _by_source(ImageFolderSource(str(tmp_path)), "train") == keys


def test_single_tree_with_seeded_val_fraction(tmp_path):
    _tree(tmp_path, {"a": 10, "b": 20, "c": 1})
    src = ImageFolderSource(str(tmp_path), val_fraction=0.3, seed=5)
    train, val = _by_source(src, "train"), _by_source(src, "val")
    assert src.splits() == ["train", "val"]
    assert not set(train) & set(val) and len(train) + len(val) == 31
    per_class = {c: sum(1 for s in val if s.startswith(c + "/")) for c in "abc"}
    assert per_class == {"a": 3, "b": 6, "c": 0}  # per class; a single image stays in train
    assert _by_source(ImageFolderSource(str(tmp_path), val_fraction=0.3, seed=5), "val") == val
    assert _by_source(ImageFolderSource(str(tmp_path), val_fraction=0.3, seed=6), "val") != val
    assert ImageFolderSource(str(tmp_path)).splits() == ["train"]  # no fraction: one split
    assert ImageFolderSource(str(tmp_path), val_fraction=0).splits() == ["train"]  # 0: no val split either


def _bad_tree(root: Path, outside: Path) -> None:
    _tree(root / "train", {"cat": 2, "dog": 2})
    _tree(root / "val", {"cat": 1})
    (root / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (root / "train" / "cat" / "text.jpg").write_text("this is not a JPEG")
    cut = _image(root / "train" / "dog" / "cut.jpg", size=(64, 64))
    cut.write_bytes(cut.read_bytes()[:300])  # truncated JPEG
    (root / "train" / "dog" / ".hidden.jpg").write_text("skipped")
    (root / "train" / ".cache").mkdir()
    _image(outside / "secret.jpg")
    (root / "train" / "dog" / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "train" / "dog" / "escape_dir").symlink_to(outside, target_is_directory=True)
    (root / "train" / "dog" / "inside.jpg").symlink_to(root / "train" / "cat" / "img0.jpg")
    (root / "train" / "dog" / "broken.jpg").symlink_to(root / "nowhere.jpg")
    os.mkfifo(root / "train" / "dog" / "pipe.jpg")
    (root / "train" / "outside_class").symlink_to(outside, target_is_directory=True)


def test_bad_files_are_quarantined_and_the_build_goes_on(tmp_path):
    root, outside, out = tmp_path / "data", tmp_path / "elsewhere", tmp_path / "out"
    _bad_tree(root, outside)
    src = ImageFolderSource(str(root))
    assert [c.id for c in src.classes()] == ["cat", "dog"]  # the escaping class link is no class
    reasons = {q.source: q.reason for q in src.quarantined("train")}
    assert reasons == {
        "train/cat/empty.jpg": "empty file",
        "train/dog/escape.jpg": f"symlink resolves outside the source root ({outside / 'secret.jpg'}): not followed",
        "train/dog/escape_dir": "symlink to a directory: not followed",
        "train/dog/broken.jpg": "broken symlink",
        "train/dog/pipe.jpg": "not a regular file (device, pipe, socket or directory)",
        "train/outside_class": f"symlink resolves outside the source root ({outside}): not followed",
    }
    inside = next(it for it in src.items("train") if it.source == "train/dog/inside.jpg")
    assert inside.label == 1 and inside.locator == (str(root / "train" / "cat" / "img0.jpg"),)

    m = build(src, str(out), Options(seed=1, shard_samples=3), workers=1)
    q = {e["source"]: e["reason"] for e in m["quarantine"]}
    assert set(q) == set(reasons) | {"train/cat/text.jpg", "train/dog/cut.jpg"}
    assert q["train/cat/text.jpg"] == "not an image: no known image format in the bytes"  # no memory address
    assert "undecodable" in q["train/dog/cut.jpg"] or "not an image" in q["train/dog/cut.jpg"]
    written = {}
    for shard in m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]:
        for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False):
            written[json.loads(s["json"])["source"]] = int(s["cls"])
    assert written == {
        "train/cat/img0.jpg": 0, "train/cat/img1.jpg": 0, "train/dog/img0.jpg": 1, "train/dog/img1.jpg": 1,
        "train/dog/inside.jpg": 1, "val/cat/img0.jpg": 0,
    }  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST] + [s["name"] for sp in m["splits"].values() for s in sp["shards"]]
        + [s["index"] for sp in m["splits"].values() for s in sp["shards"]]
        + list(reader_files(m))
    )  # fmt: skip


def test_build_reads_back_and_is_byte_identical(tmp_path):
    _tree(tmp_path / "src", {"b": 4, "a": 5})
    _image(tmp_path / "src" / "a" / "p.png", "PNG")  # a PNG is re-encoded as JPEG, marked repaired
    opts = Options(seed=2, shard_samples=4)
    m1 = build(ImageFolderSource(str(tmp_path / "src"), val_fraction=0.25), str(tmp_path / "o1"), opts, workers=2)
    m2 = build(ImageFolderSource(str(tmp_path / "src"), val_fraction=0.25), str(tmp_path / "o2"), opts, workers=1)
    assert m1["splits"] == m2["splits"] and m1["dataset"] == "imagefolder"
    assert (m1["splits"]["train"]["samples"], m1["splits"]["val"]["samples"]) == (7, 3)
    for split in m1["splits"].values():
        for shard in split["shards"]:
            assert (tmp_path / "o1" / shard["name"]).read_bytes() == (tmp_path / "o2" / shard["name"]).read_bytes()
            with tarfile.open(tmp_path / "o1" / shard["name"]) as tf:
                names = tf.getnames()
            assert len(names) == 4 * shard["samples"]
    shards = [str(tmp_path / "o1" / sh["name"]) for split in m1["splits"].values() for sh in split["shards"]]
    samples = [s for sh in shards for s in wds.WebDataset(sh, shardshuffle=False)]
    assert len(samples) == 10
    png = next(s for s in samples if s["__key__"] == "p")
    meta = json.loads(png["json"])
    assert meta["repaired"] == "png" and meta["class"] == "a" and int(png["cls"]) == 0
    assert Image.open(io.BytesIO(png["jpg"])).format == "JPEG"


@pytest.mark.parametrize(
    "setup, kwargs, message",
    [
        (lambda r: None, {}, "does not exist"),
        (lambda r: r.write_text("x"), {}, "is not a folder"),
        (lambda r: r.mkdir(), {}, "no class folders"),
        (lambda r: (r / "train").mkdir(parents=True), {}, "no class folders"),
        (lambda r: (r / "a" / "b").mkdir(parents=True) or (r / "a" / "x.txt").write_text("x"), {}, "no images"),
        (
            lambda r: (_tree(r / "train", {"a": 1}), _tree(r / "val", {"a": 1, "zz": 1})),
            {},
            "val classes not in train: zz",
        ),
        (lambda r: (_tree(r / "train", {"a": 1}), _tree(r / "val", {"a": 1})), {"val_fraction": 0.2}, "single tree"),
        (lambda r: _tree(r, {"a": 1}), {"val_fraction": 1.0}, "below 1"),
    ],
    ids=["missing", "file", "empty", "empty-train", "no-images", "val-class", "fraction-with-val", "bad-fraction"],
)
def test_unusable_trees_give_one_line_errors(tmp_path, setup, kwargs, message):
    root = tmp_path / "root"
    setup(root)
    with pytest.raises(ImageFolderError) as e:
        ImageFolderSource(str(root), **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_subfolder_is_quarantined(tmp_path, monkeypatch):
    _tree(tmp_path, {"a": 2})
    (tmp_path / "a" / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # as root, chmod cannot make a folder unreadable: fail the listing instead
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    src = ImageFolderSource(str(tmp_path))
    assert [(q.source, q.reason) for q in src.quarantined("train")] == [
        ("a/locked", "cannot list folder: Permission denied")
    ]
    assert len(src.items("train")) == 2


def test_source_pickles_without_its_index(tmp_path):
    _tree(tmp_path, {"a": 30, "b": 30})
    src = ImageFolderSource(str(tmp_path), val_fraction=0.5, seed=1)
    blob = pickle.dumps(src)
    assert len(blob) < 500  # workers get the root and options, not the file list
    again = pickle.loads(blob)
    assert again.items("val") == src.items("val") and again.classes() == src.classes()
    assert again.read(src.items("train")[0]) == (tmp_path / src.items("train")[0].source).read_bytes()


def test_empty_class_folders_are_an_error_naming_them(tmp_path):
    _tree(tmp_path / "train", {"ant": 2, "bee": 1})
    _tree(tmp_path / "val", {"ant": 1})
    (tmp_path / "train" / "cow").mkdir()
    (tmp_path / "val" / "bee").mkdir()
    (tmp_path / "val" / "bee" / "notes.txt").write_text("not an image")
    with pytest.raises(ImageFolderError) as e:
        ImageFolderSource(str(tmp_path))
    message = str(e.value)
    assert "class folders with no images" in message and "train/cow, val/bee" in message
    assert "--allow-empty-classes" in message and "\n" not in message


def test_allow_empty_classes_keeps_them_and_the_manifest_lists_them(tmp_path):
    from torchvision.datasets import ImageFolder

    _tree(tmp_path / "src", {"ant": 2, "cow": 2})
    (tmp_path / "src" / "bee").mkdir()
    src = open_source("imagefolder", str(tmp_path / "src"), allow_empty_classes=True)
    assert [c.id for c in src.classes()] == ["ant", "bee", "cow"]  # labels as ImageFolder gives (allow_empty=True)
    tv = ImageFolder(str(tmp_path / "src"), allow_empty=True)
    assert tv.class_to_idx == {c.id: c.index for c in src.classes()}
    m = build(src, str(tmp_path / "out"), Options(shard_samples=10), workers=1)
    assert m["empty_classes"] == ["bee"] and [c["id"] for c in m["classes"]] == ["ant", "bee", "cow"]
