"""ImageNetSource on the ILSVRC2012-layout fixture: classes, labels, offsets, bad members, MD5."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import pytest
from ilsvrc_fixture import DEVKIT, TRAIN_TAR, VAL_TAR, make_ilsvrc

from shards.checksums import OFFICIAL_MD5, ChecksumError, md5_file, parse_md5
from shards.sources import open_source, tarindex
from shards.sources.imagenet import ImageNetError, ImageNetSource
from shards.sources.tarindex import member_key


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ilsvrc")
    return root, make_ilsvrc(root)


@pytest.fixture(scope="module")
def src(fx) -> ImageNetSource:
    return ImageNetSource(str(fx[0]))


def _copy(fx, dest: Path, names=(TRAIN_TAR, VAL_TAR, DEVKIT)) -> Path:
    dest.mkdir()
    for n in names:
        os.link(fx[0] / n, dest / n)
    return dest


def test_open_source_builds_an_imagenet_source(fx):
    s = open_source("imagenet", str(fx[0]), check_md5=False, md5=None)
    assert isinstance(s, ImageNetSource) and s.dataset == "imagenet"
    assert s.splits() == ["train", "val"]


def test_classes_are_sorted_leaf_wnids_with_names(fx, src):
    exp = fx[1]
    classes = src.classes()
    assert [c.id for c in classes] == exp["wnids"]  # non-leaf rows (n00001740 sorts first) ignored
    assert [c.index for c in classes] == list(range(len(exp["wnids"])))
    assert all(c.name and "," not in c.name for c in classes)


def test_devkit_parsed_like_torchvision(fx, src, tmp_path, monkeypatch):
    """torchvision's own parse_devkit_archive on the same devkit gives the same classes and val wnids."""
    import torch
    from torchvision.datasets import imagenet as tv

    exp = fx[1]
    monkeypatch.setitem(tv.ARCHIVE_META, "devkit", (DEVKIT, exp["md5"][DEVKIT]))
    ref = _copy(fx, tmp_path / "tv", names=(DEVKIT,))
    tv.parse_devkit_archive(str(ref))
    wnid_to_classes, val_wnids = torch.load(ref / tv.META_FILE, weights_only=True)
    assert sorted(wnid_to_classes) == [c.id for c in src.classes()]
    assert [wnid_to_classes[c.id][0] for c in src.classes()] == [c.name for c in src.classes()]
    assert val_wnids == src.devkit.val_wnids


def test_train_items_carry_labels_from_their_class_tar(fx, src):
    _, exp = fx
    items = {it.key: it for it in src.items("train")}
    truncated = {b["key"] for b in exp["bad"] if b["split"] == "train" and b["kind"] == "truncated"}
    # Truncation is found when the image is decoded at build time, not while indexing headers.
    assert set(items) == set(exp["train"]) | truncated
    for key, label in exp["train"].items():
        assert items[key].label == label
        assert items[key].class_id == exp["wnids"][label]
        assert items[key].size == items[key].locator[2] > 0


def test_val_labels_come_from_ground_truth_not_member_order(fx, src):
    root, exp = fx
    with tarfile.open(root / VAL_TAR) as tf:
        names = [m.name for m in tf.getmembers()]
    assert names != sorted(names)  # the trap is really there
    labels = {it.key: it.label for it in src.items("val")}
    for key, label in exp["val"].items():
        assert labels[key] == label
    # The devkit's IDs are not label+1: ID order is not sorted-wnid order.
    assert any(label != i for i, label in enumerate(labels[k] for k in sorted(exp["val"])))


def test_read_returns_member_bytes_by_offset(fx, src):
    root, _ = fx
    with tarfile.open(root / TRAIN_TAR) as outer:
        for item in src.items("train")[:6]:
            tar_name, inner_name = item.source.split("/", 1)
            with tarfile.open(fileobj=io.BytesIO(outer.extractfile(tar_name).read())) as inner:
                assert src.read(item) == inner.extractfile(inner_name).read()
    with tarfile.open(root / VAL_TAR) as tf:
        for item in src.items("val")[:3]:
            assert src.read(item) == tf.extractfile(item.source).read()


def test_indexing_reads_headers_only(fx, monkeypatch):
    """No image bytes are read while indexing: every read is a header-sized one."""
    sizes: list[int] = []
    real = os.pread

    def counting_pread(fd, n, offset):
        sizes.append(n)
        return real(fd, n, offset)

    monkeypatch.setattr(tarindex.os, "pread", counting_pread)
    s = ImageNetSource(str(fx[0]))
    s.items("train")
    s.items("val")
    assert sizes and max(sizes) <= 512
    assert sum(sizes) < os.path.getsize(fx[0] / TRAIN_TAR) / 4


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "empty"])
def test_bad_member_is_quarantined_with_reason(fx, src, kind):
    _, exp = fx
    reasons = {"dotdot": "'..'", "absolute": "absolute path", "symlink": "symlink", "hardlink": "hard link",
               "empty": "empty file"}  # fmt: skip
    planted = [b for b in exp["bad"] if b["kind"] == kind]
    assert planted
    for b in planted:
        q = {x.source: x for x in src.quarantined(b["split"])}
        assert b["source"] in q, f"{b} not quarantined"
        assert reasons[kind] in q[b["source"]].reason
        key = q[b["source"]].key
        assert "/" not in key and "." not in key and key not in {it.key for it in src.items(b["split"])}


def test_keys_are_sanitized():
    assert member_key("n01440764_10026.JPEG") == "n01440764_10026"
    assert member_key("ILSVRC2012_val_00000001.JPEG") == "ILSVRC2012_val_00000001"
    assert member_key("a.b.c.JPEG") == "a_b_c"
    assert member_key("../../etc/pass wd.JPEG") == "pass_wd"
    assert member_key("/abs/x.y") == "x"
    assert member_key("..") == "__"


def test_pickled_source_drops_index_and_still_reads(fx, src):
    items = src.items("train")
    blob = pickle.dumps(src)
    assert len(blob) < 20_000  # the class list, not the item index
    copy = pickle.loads(blob)
    assert copy.read(items[0]) == src.read(items[0])


def test_missing_devkit_is_a_one_line_error(fx, tmp_path):
    root = _copy(fx, tmp_path / "nodevkit", names=(TRAIN_TAR, VAL_TAR))
    with pytest.raises(ImageNetError, match=DEVKIT) as e:
        ImageNetSource(str(root))
    assert "\n" not in str(e.value)


def test_missing_split_archive_is_not_offered(fx, tmp_path):
    root = _copy(fx, tmp_path / "trainonly", names=(TRAIN_TAR, DEVKIT))
    s = ImageNetSource(str(root))
    assert s.splits() == ["train"]
    with pytest.raises(ImageNetError, match=VAL_TAR):
        s.items("val")


def test_no_archive_at_all_is_an_error(fx, tmp_path):
    root = _copy(fx, tmp_path / "devkitonly", names=(DEVKIT,))
    with pytest.raises(ImageNetError, match=f"missing {TRAIN_TAR} and {VAL_TAR}"):
        ImageNetSource(str(root))
    with pytest.raises(ImageNetError, match="does not exist"):
        ImageNetSource(str(tmp_path / "nowhere"))


def test_truncated_train_archive_is_a_clear_error(fx, tmp_path):
    root = _copy(fx, tmp_path / "cut", names=(VAL_TAR, DEVKIT))
    data = (fx[0] / TRAIN_TAR).read_bytes()
    (root / TRAIN_TAR).write_bytes(data[: len(data) // 3 + 100])
    s = ImageNetSource(str(root))  # the devkit is fine; the cut shows when train is indexed
    with pytest.raises(ImageNetError, match="damaged or truncated") as e:
        s.items("train")
    assert TRAIN_TAR in str(e.value) and "\n" not in str(e.value)


def test_damaged_inner_tar_is_quarantined(fx, tmp_path):
    root = _copy(fx, tmp_path / "badinner", names=(VAL_TAR, DEVKIT))
    wnid = fx[1]["wnids"][0]
    junk = b"this is not a tar archive at all" * 40
    with tarfile.open(fx[0] / TRAIN_TAR) as src_tf, tarfile.open(root / TRAIN_TAR, "w") as out:
        for m in src_tf.getmembers():
            data = src_tf.extractfile(m).read() if m.isreg() else b""
            if m.name == f"{wnid}.tar":
                data = junk
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    s = ImageNetSource(str(root))
    assert not [it for it in s.items("train") if it.class_id == wnid]
    assert any(q.source == f"{wnid}.tar" and "damaged class archive" in q.reason for q in s.quarantined("train"))


def test_val_count_mismatch_with_ground_truth_is_an_error(fx, tmp_path):
    root = _copy(fx, tmp_path / "valshort", names=(TRAIN_TAR, DEVKIT))
    with tarfile.open(fx[0] / VAL_TAR) as src_tf, tarfile.open(root / VAL_TAR, "w") as out:
        members = [m for m in src_tf.getmembers() if m.isreg()]
        for m in members[1:]:
            out.addfile(m, src_tf.extractfile(m))
    with pytest.raises(ImageNetError, match="ground truth lists"):
        ImageNetSource(str(root)).items("val")


def test_check_md5_with_official_digests_names_file_and_both_digests(fx):
    root, exp = fx
    with pytest.raises(ChecksumError) as e:
        ImageNetSource(str(root), check_md5=True)
    msg = str(e.value)
    assert DEVKIT in msg and OFFICIAL_MD5[DEVKIT] in msg and exp["md5"][DEVKIT] in msg and "\n" not in msg


def test_check_md5_overrides_win(fx):
    root, exp = fx
    s = ImageNetSource(str(root), check_md5=True, md5=dict(exp["md5"]))
    assert s.splits() == ["train", "val"]
    wrong = dict(exp["md5"]) | {TRAIN_TAR: "0" * 32}
    with pytest.raises(ChecksumError, match=f"{TRAIN_TAR}: expected {'0' * 32}, got {exp['md5'][TRAIN_TAR]}"):
        ImageNetSource(str(root), check_md5=True, md5=wrong)


def test_an_explicit_md5_of_a_local_archive_is_checked_without_check_md5(fx):
    root, exp = fx
    ImageNetSource(str(root), md5={VAL_TAR: exp["md5"][VAL_TAR]})  # right: fine (the others are not hashed)
    with pytest.raises(ChecksumError, match=f"{VAL_TAR}: expected {'0' * 32}"):
        ImageNetSource(str(root), md5={VAL_TAR: "0" * 32})


def test_md5_names_are_checked_against_the_archives_expected():
    expected = [TRAIN_TAR, VAL_TAR, DEVKIT]
    assert parse_md5({f"/data/{VAL_TAR}": "B" * 32}, expected) == {VAL_TAR: "b" * 32}  # a deployment's mapping
    with pytest.raises(ChecksumError) as e:
        parse_md5(["ILSVRC2012_img_vall.tar=" + "0" * 32], expected)
    assert str(e.value) == (
        f"--md5 ILSVRC2012_img_vall.tar: not an archive of this source (expected: {DEVKIT}, {TRAIN_TAR}, {VAL_TAR})"
    )


def test_md5_file_and_override_parsing(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(100_000))
    assert md5_file(p, progress=False) == hashlib.md5(p.read_bytes()).hexdigest()
    assert parse_md5([f"/x/{TRAIN_TAR}=" + "A" * 32]) == {TRAIN_TAR: "a" * 32}
    for bad in ["nohash", f"{TRAIN_TAR}=xyz", "=" + "a" * 32]:
        with pytest.raises(ChecksumError, match="NAME=HEX"):
            parse_md5([bad])


def _rewrite_train(fx, root: Path, extra: list[tuple[str, bytes]]) -> None:
    """The fixture's train tar plus `extra` outer members."""
    with tarfile.open(fx[0] / TRAIN_TAR) as src_tf, tarfile.open(root / TRAIN_TAR, "w") as out:
        for m in src_tf.getmembers():
            out.addfile(m, src_tf.extractfile(m) if m.isreg() else None)
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def test_outer_members_that_are_not_class_tars_are_quarantined(fx, tmp_path):
    root = _copy(fx, tmp_path / "extra", names=(VAL_TAR, DEVKIT))
    wnids = fx[1]["wnids"]
    with tarfile.open(fx[0] / TRAIN_TAR) as tf:
        class_tar = tf.extractfile(f"{wnids[0]}.tar").read()
    # n00001740 is a non-leaf synset of the devkit: not a class, whatever its archive holds.
    _rewrite_train(fx, root, [("README.txt", b"hello"), ("n00001740.tar", class_tar)])
    s = ImageNetSource(str(root))
    q = {x.source: x.reason for x in s.quarantined("train")}
    assert "not a class archive" in q["README.txt"]
    assert "not one of the devkit's leaf synsets" in q["n00001740.tar"]
    assert {it.class_id for it in s.items("train")} == set(wnids)


def test_duplicate_keys_are_quarantined(fx, tmp_path):
    root = _copy(fx, tmp_path / "dups", names=(VAL_TAR, DEVKIT))
    wnids = fx[1]["wnids"]
    with tarfile.open(fx[0] / TRAIN_TAR) as tf:
        class_tar = tf.extractfile(f"{wnids[0]}.tar").read()
    _rewrite_train(fx, root, [(f"subdir/{wnids[1]}.tar", class_tar)])  # same member names, again
    s = ImageNetSource(str(root))
    keys = [it.key for it in s.items("train")]
    assert len(keys) == len(set(keys))
    dups = [x for x in s.quarantined("train") if x.reason.startswith("duplicate key")]
    assert dups and all(x.source.startswith(f"subdir/{wnids[1]}.tar/") for x in dups)


def test_ground_truth_naming_a_non_leaf_id_is_an_error(fx, tmp_path):
    root = _copy(fx, tmp_path / "badtruth", names=(TRAIN_TAR, VAL_TAR))
    n_leaves = len(fx[1]["wnids"])
    with tarfile.open(fx[0] / DEVKIT, "r:gz") as src_tf, tarfile.open(root / DEVKIT, "w:gz") as out:
        for m in src_tf.getmembers():
            data = src_tf.extractfile(m).read() if m.isreg() else b""
            if m.name.endswith("ground_truth.txt"):
                data = f"{n_leaves + 1}\n".encode() + data.split(b"\n", 1)[1]  # a non-leaf row's ID
                m.size = len(data)
            out.addfile(m, io.BytesIO(data) if m.isreg() else None)
    with pytest.raises(ImageNetError, match=r"line 1 .* not the ID of a leaf synset"):
        ImageNetSource(str(root))
