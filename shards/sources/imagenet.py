"""ImageNet ILSVRC2012 from its three official archives, read in place.

    root/ILSVRC2012_img_train.tar       a tar of 1000 class tars n<wnid>.tar, each of n<wnid>_<num>.JPEG
    root/ILSVRC2012_img_val.tar         50,000 ILSVRC2012_val_<num>.JPEG, not in alphabetical order
    root/ILSVRC2012_devkit_t12.tar.gz   data/meta.mat (synsets) and data/ILSVRC2012_validation_ground_truth.txt

Nothing is extracted: indexing reads tar headers only (tarindex.py), and an item's locator is
(archive path, absolute offset, size), read back with one positioned read. Labels are indexes
into the sorted leaf wnids of meta.mat, as torchvision.datasets.ImageNet gives them; val labels
come from the devkit's ground truth (one ILSVRC2012_ID per line, for the val images in
alphabetical file-name order) through meta.mat's ID -> WNID map, never from the tar's order.

Members that are links, devices or directories, whose names are absolute or hold '..', or that
are empty are never read: they are listed by `quarantined(split)` with the reason. Keys are
built from the member's file stem with anything but [A-Za-z0-9_-] replaced, so no name in
an archive can steer a write outside the output folder.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from tqdm import tqdm

from shards.checksums import OFFICIAL_MD5, expected_md5, verify_md5
from shards.sources.tarindex import Member, iter_members, member_key, unsafe_reason
from shards.types import ClassInfo, Item, Quarantined

log = logging.getLogger("shards")

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
ARCHIVES = {"train": TRAIN_TAR, "val": VAL_TAR}
META_MAT = "ILSVRC2012_devkit_t12/data/meta.mat"
VAL_GROUND_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
# Field order of meta.mat's synsets records; torchvision reads them by position.
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children")


class ImageNetError(ValueError):
    """The archives are missing, damaged or inconsistent; the message is one line."""


@dataclass(frozen=True)
class Devkit:
    classes: list[ClassInfo]  # leaf synsets, sorted by wnid: index == label
    val_wnids: list[str]  # wnid of each val image, in alphabetical file-name order


def _devkit_member(tf: tarfile.TarFile, name: str, path: str) -> bytes:
    # The official archive uses exactly `name`; accept the same tail under another top folder.
    tail = name.split("/", 1)[1]
    for info in tf.getmembers():
        if info.isreg() and (info.name == name or info.name.endswith("/" + tail)):
            f = tf.extractfile(info)
            assert f is not None
            return f.read()
    raise ImageNetError(f"{path} holds no {tail}: not an ILSVRC2012 devkit")


def parse_meta_mat(raw: bytes) -> tuple[dict[int, str], dict[str, str]]:
    """(ILSVRC2012_ID -> wnid, wnid -> words) for leaf synsets, read as torchvision's
    parse_devkit_archive.parse_meta_mat reads them (loadmat squeeze_me=True, fields by position)."""
    import scipy.io as sio

    try:
        meta = sio.loadmat(io.BytesIO(raw), squeeze_me=True)["synsets"]
    except Exception as e:  # scipy raises ValueError, MatReadError, KeyError...
        raise ImageNetError(f"devkit meta.mat is unreadable: {type(e).__name__}: {e}") from None
    names = tuple(meta.dtype.names or ())
    if names[: len(SYNSET_FIELDS)] != SYNSET_FIELDS:
        raise ImageNetError(f"devkit meta.mat synsets have fields {names}, expected {SYNSET_FIELDS} first")
    nums_children = list(zip(*meta))[4]
    meta = [meta[idx] for idx, num_children in enumerate(nums_children) if num_children == 0]
    idcs, wnids, words = list(zip(*meta))[:3]
    idx_to_wnid = {int(idx): str(wnid) for idx, wnid in zip(idcs, wnids)}
    wnid_to_words = {str(wnid): str(w) for wnid, w in zip(wnids, words)}
    return idx_to_wnid, wnid_to_words


def read_devkit(path: str) -> Devkit:
    try:
        with tarfile.open(path, "r:gz") as tf:
            meta_raw = _devkit_member(tf, META_MAT, path)
            truth_raw = _devkit_member(tf, VAL_GROUND_TRUTH, path)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ImageNetError(f"{path} is not a readable tar.gz: {e}") from None
    idx_to_wnid, wnid_to_words = parse_meta_mat(meta_raw)
    wnids = sorted(wnid_to_words)
    # "tench, Tinca tinca" -> "tench": the first of the synonyms, as torchvision's classes[i][0].
    classes = [ClassInfo(i, w, wnid_to_words[w].split(", ")[0]) for i, w in enumerate(wnids)]
    val_wnids = []
    for lineno, line in enumerate(truth_raw.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            val_wnids.append(idx_to_wnid[int(line)])
        except (ValueError, KeyError):
            raise ImageNetError(
                f"{path}: ground truth line {lineno} ({line.strip()!r}) is not the ID of a leaf synset in meta.mat"
            ) from None
    return Devkit(classes, val_wnids)


class ImageNetSource:
    """The ILSVRC2012 archives in folder `root`, as a Source (shards/types.py).

    The devkit is required; a split whose archive is absent is not offered. With check_md5,
    every present archive is hashed before anything else and compared with `md5[name]` if
    given, else the official digest (shards/checksums.py); without check_md5, only the
    archives named in `md5` are checked.
    """

    dataset = "imagenet"

    def __init__(self, root: str, check_md5: bool = False, md5: dict[str, str] | None = None) -> None:
        if root is None:
            raise ImageNetError("imagenet needs --source: a folder holding the ILSVRC2012 archives")
        root = str(root)
        if "://" in root and not root.startswith("file://"):
            raise ImageNetError(f"imagenet reads a local folder, not {root}: download the archives first")
        self.root = os.path.abspath(root.removeprefix("file://"))
        if not os.path.isdir(self.root):
            raise ImageNetError(f"ImageNet source folder {self.root} does not exist")
        devkit = os.path.join(self.root, DEVKIT)
        if not os.path.isfile(devkit):
            raise ImageNetError(f"missing {DEVKIT} in {self.root} (the devkit holds the class list and val labels)")
        self.archives = {s: os.path.join(self.root, n) for s, n in ARCHIVES.items()}
        self.archives = {s: p for s, p in self.archives.items() if os.path.isfile(p)}
        if not self.archives:
            raise ImageNetError(f"missing {TRAIN_TAR} and {VAL_TAR} in {self.root}: no split to build")
        # check_md5: every archive, against --md5 or the official digest; without it, only
        # the archives given an explicit --md5 (a digest given is a digest to check).
        for path in [devkit, *self.archives.values()]:
            name = os.path.basename(path)
            if check_md5 or name in (md5 or {}):
                verify_md5(path, expected_md5(name, md5) or OFFICIAL_MD5[name])
                log.info("md5 ok: %s", name)
        self.devkit = read_devkit(devkit)
        self._labels = {c.id: c.index for c in self.devkit.classes}
        self._index: dict[str, tuple[list[Item], list[Quarantined]]] = {}
        self._fds: dict[str, int] = {}

    # The source is pickled to every worker process: send the class list, not the index of
    # 1.28M items (workers only call read()), and never a file descriptor.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_index"], state["_fds"] = {}, {}
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def classes(self) -> list[ClassInfo]:
        return list(self.devkit.classes)

    def splits(self) -> list[str]:
        return [s for s in ("train", "val") if s in self.archives]

    def items(self, split: str) -> list[Item]:
        return self._indexed(split)[0]

    def quarantined(self, split: str) -> list[Quarantined]:
        return self._indexed(split)[1]

    def read(self, item: Item) -> bytes:
        path, offset, size = item.locator
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, size, offset)
        while len(data) < size:  # pread may return short on some filesystems; EOF means truncation
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                raise OSError(f"{path} ends before the end of {item.source} (truncated archive?)")
            data += more
        return data

    # -- indexing ---------------------------------------------------------------------------

    def _indexed(self, split: str) -> tuple[list[Item], list[Quarantined]]:
        if split not in self.archives:
            raise ImageNetError(f"no {ARCHIVES.get(split, split)} in {self.root}: split {split!r} is not available")
        if split not in self._index:
            path = self.archives[split]
            fd = os.open(path, os.O_RDONLY)
            try:
                self._index[split] = self._index_train(fd, path) if split == "train" else self._index_val(fd, path)
            except tarfile.TarError as e:
                raise ImageNetError(f"{path} is damaged or truncated: {type(e).__name__}: {e}") from None
            finally:
                os.close(fd)
            items, bad = self._index[split]
            log.info("imagenet %s: %d images indexed, %d members quarantined", split, len(items), len(bad))
        return self._index[split]

    def _index_train(self, fd: int, path: str) -> tuple[list[Item], list[Quarantined]]:
        items: list[Item] = []
        bad: list[Quarantined] = []
        seen: dict[str, str] = {}
        outer = list(iter_members(fd, name=path))  # ~1000 headers
        for m in tqdm(outer, desc="indexing train", unit="class", mininterval=1.0):
            reason = unsafe_reason(m)
            wnid = PurePosixPath(m.name).name.removesuffix(".tar")
            if reason is None and not m.name.endswith(".tar"):
                reason = "not a class archive (expected n<wnid>.tar)"
            if reason is None and wnid not in self._labels:
                reason = f"{wnid} is not one of the devkit's leaf synsets"
            if reason:
                bad.append(Quarantined(member_key(m.name), m.name, reason))
                continue
            label, class_id = self._labels[wnid], wnid
            try:
                for im in iter_members(fd, m.offset, m.size, name=m.name):
                    self._add(items, bad, seen, im, f"{m.name}/{im.name}", path, label, class_id)
            except tarfile.TarError as e:
                bad.append(Quarantined(member_key(m.name), m.name, f"damaged class archive: {type(e).__name__}: {e}"))
        return items, bad

    def _index_val(self, fd: int, path: str) -> tuple[list[Item], list[Quarantined]]:
        bad: list[Quarantined] = []
        images: list[Member] = []
        for m in tqdm(iter_members(fd, name=path), desc="indexing val", unit="img", mininterval=1.0):
            reason = unsafe_reason(m)
            if reason:
                bad.append(Quarantined(member_key(m.name), m.name, reason))
            else:
                images.append(m)
        truth = self.devkit.val_wnids
        if len(images) != len(truth):
            raise ImageNetError(
                f"{path} holds {len(images)} images but the devkit ground truth lists {len(truth)}: cannot pair labels"
            )
        # Ground truth line i belongs to the i-th val image in alphabetical file-name order.
        images.sort(key=lambda m: (PurePosixPath(m.name).name, m.name))
        items: list[Item] = []
        seen: dict[str, str] = {}
        for m, wnid in zip(images, truth):
            self._add(items, bad, seen, m, m.name, path, self._labels[wnid], wnid)
        return items, bad

    @staticmethod
    def _add(
        items: list[Item], bad: list[Quarantined], seen: dict[str, str],
        m: Member, source: str, path: str, label: int, class_id: str,
    ) -> None:  # fmt: skip
        key = member_key(m.name)
        reason = unsafe_reason(m)
        if reason is None and m.size == 0:
            reason = "empty file"
        if reason is None and key in seen:
            reason = f"duplicate key {key} (also {seen[key]})"
        if reason:
            bad.append(Quarantined(key, source, reason))
            return
        seen[key] = source
        items.append(Item(key, label, class_id, source, (path, m.offset, m.size), m.size))
