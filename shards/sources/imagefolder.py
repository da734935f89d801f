"""Class-per-subfolder image trees, for people's own data (torchvision ImageFolder's layout).

    root/train/<class>/**/<image>   and/or   root/val/<class>/**/<image>    splits = those present
    root/<class>/**/<image>                                                 one tree: split "train",
                                                                            or train + val by val_fraction

Classes are the sorted class-folder names (val classes must also exist in train), so labels are
the indexes torchvision's ImageFolder gives. A class folder with no images is an error, as in
ImageFolder, unless allow_empty_classes keeps it: a class with no images, listed in the
manifest's "empty_classes". Images are recognised by extension (any case);
whether the bytes really are an image is decided later, when they are packed.

Nothing outside root is ever read: a symlink that resolves outside root, a link to a
directory, a broken link, a device, pipe or socket, and an empty file are listed by
`quarantined(split)` with the reason instead. Hidden files and folders are skipped.

Keys are the file stem with anything but [A-Za-z0-9_-] replaced by '_'. Where two files of a
split would get the same key (a.jpg and a.png, or the same name in two classes), those
files take a longer key that includes their class folder and sub-path, so keys stay unique and
depend only on the tree, never on the order a directory listing happens to return.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import stat
from collections import Counter
from dataclasses import dataclass

from shards.types import ClassInfo, Item, Quarantined

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ImageFolderError(ValueError):
    """The tree is missing or unusable; the message is one line."""


@dataclass(frozen=True)
class _File:
    rel: str  # path relative to root, with '/' separators: the sample's source
    class_id: str
    sub: str  # path relative to the class folder, with '/' separators
    real: str  # the regular file to read (the link's target for an in-root symlink)
    size: int


def _sanitize(text: str) -> str:
    return _KEY_UNSAFE.sub("_", text) or "_"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class _Scan:
    """Files and rejects of one class-folder tree (root/train, root/val, or root itself)."""

    def __init__(self, root_real: str, root_shown: str, tree: str) -> None:
        self.root_real, self.root_shown = root_real, root_shown
        self.classes: list[str] = []
        self.files: list[_File] = []
        self.rejected: list[Quarantined] = []
        tree_path = os.path.join(root_shown, tree) if tree else root_shown
        try:
            names = sorted(os.listdir(tree_path))
        except OSError as e:
            raise ImageFolderError(f"cannot list {tree_path}: {e.strerror}") from None
        for name in names:
            path = os.path.join(tree_path, name)
            if name.startswith("."):
                continue
            rel = self._rel(path)
            if os.path.islink(path):
                # A symlinked class folder is followed only if it stays inside root.
                target = os.path.realpath(path)
                if not _inside(target, root_real):
                    self._reject(rel, f"symlink resolves outside the source root ({target}): not followed")
                    continue
            if os.path.isdir(path):
                self.classes.append(name)
                self._walk_class(path, name)

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root_shown).replace(os.sep, "/")

    def _reject(self, rel: str, reason: str) -> None:
        self.rejected.append(Quarantined(_sanitize(os.path.splitext(os.path.basename(rel))[0]), rel, reason))

    def _walk_class(self, class_dir: str, class_id: str) -> None:
        def unreadable(e: OSError) -> None:
            self._reject(self._rel(e.filename or class_dir), f"cannot list folder: {e.strerror}")

        for dirpath, dirnames, filenames in os.walk(class_dir, onerror=unreadable, followlinks=False):
            # os.walk never descends into linked directories; say so for each one, and skip hidden ones.
            kept = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                if os.path.islink(os.path.join(dirpath, d)):
                    self._reject(self._rel(os.path.join(dirpath, d)), "symlink to a directory: not followed")
                else:
                    kept.append(d)
            dirnames[:] = kept
            for name in sorted(filenames):
                if not name.startswith(".") and _is_image_name(name):
                    self._add(os.path.join(dirpath, name), class_dir, class_id)

    def _add(self, path: str, class_dir: str, class_id: str) -> None:
        rel = self._rel(path)
        try:
            st = os.lstat(path)
            real = path
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(path)
                if not _inside(real, self.root_real):
                    return self._reject(rel, f"symlink resolves outside the source root ({real}): not followed")
                st = os.stat(real)
        except FileNotFoundError:
            return self._reject(rel, "broken symlink")
        except OSError as e:
            return self._reject(rel, f"cannot stat: {e.strerror}")
        if not stat.S_ISREG(st.st_mode):
            return self._reject(rel, "not a regular file (device, pipe, socket or directory)")
        if st.st_size == 0:
            return self._reject(rel, "empty file")
        sub = os.path.relpath(path, class_dir).replace(os.sep, "/")
        self.files.append(_File(rel, class_id, sub, real, st.st_size))


def _unique_keys(files: list[_File]) -> dict[str, str]:
    """rel -> key, unique: the stem where it is unique, longer forms only for the files that collide."""

    def form(f: _File, level: int) -> str:
        stem, ext = os.path.splitext(f.sub)
        if level == 0:
            return _sanitize(os.path.basename(stem))
        if level == 1:
            return _sanitize(f"{f.class_id}_{stem}")
        if level == 2:
            return _sanitize(f"{f.class_id}_{stem}_{ext.lstrip('.')}")
        return _sanitize(f"{f.class_id}_{f.sub}") + "-" + hashlib.sha1(f.rel.encode()).hexdigest()[:10]

    level = {f.rel: 0 for f in files}
    while True:
        keys = {f.rel: form(f, level[f.rel]) for f in files}
        counts = Counter(keys.values())
        clashing = [f for f in files if counts[keys[f.rel]] > 1]
        if not clashing:
            return keys
        bumped = False
        for f in clashing:
            if level[f.rel] < 3:
                level[f.rel] += 1
                bumped = True
        if not bumped:  # only if two paths hash alike: unreachable in practice
            raise ImageFolderError(f"cannot make unique keys for {[f.rel for f in clashing][:3]}")


def _split_by_fraction(files: list[_File], fraction: float, seed: int) -> tuple[list[_File], list[_File]]:
    """(train, val): per class, a seeded shuffle of the sorted files, the first round(n * fraction) to val.

    Per class, so every class is in both splits in proportion; by class name in the seed, so a
    class's split does not change when another class gains files.
    """
    train, val = [], []
    for class_id in sorted({f.class_id for f in files}):
        members = sorted((f for f in files if f.class_id == class_id), key=lambda f: f.rel)
        random.Random(f"{seed}:{class_id}").shuffle(members)
        n_val = min(int(len(members) * fraction + 0.5), len(members) - 1)  # train keeps at least one
        val += members[:n_val]
        train += members[n_val:]
    return train, val


@dataclass
class _Index:
    class_ids: list[str]  # sorted: index == label
    files: dict[str, list[_File]]  # per split
    keys: dict[str, dict[str, str]]  # per split: rel -> key
    rejected: dict[str, list[Quarantined]]  # per split


def _empty_classes(scan: _Scan) -> list[str]:
    full = {f.class_id for f in scan.files}
    return [c for c in scan.classes if c not in full]


def _index_tree(root: str, val_fraction: float | None, seed: int, allow_empty: bool) -> _Index:
    root_real = os.path.realpath(root)
    present = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    if val_fraction is not None and "val" in present:
        raise ImageFolderError(f"{root} already has a val/ folder: val_fraction splits a single tree only")
    scans = {s: _Scan(root_real, root, s) for s in present} or {"train": _Scan(root_real, root, "")}
    for s, scan in scans.items():
        if not scan.classes:
            where = os.path.join(root, s) if present else root
            raise ImageFolderError(f"no class folders in {where} (expected <class>/<image> inside)")
    if "train" in scans and "val" in scans:
        extra = sorted(set(scans["val"].classes) - set(scans["train"].classes))
        if extra:
            more = " ..." if len(extra) > 5 else ""
            raise ImageFolderError(f"val classes not in train: {', '.join(extra[:5])}{more}")
    if not any(scan.files for scan in scans.values()):
        raise ImageFolderError(f"no images in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    empty = [f"{s}/{c}" if present else c for s, scan in scans.items() for c in _empty_classes(scan)]
    if empty and not allow_empty:
        more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        raise ImageFolderError(
            f"class folders with no images in {root}: {', '.join(empty[:10])}{more} "
            "(torchvision's ImageFolder refuses them too): remove them, or pass --allow-empty-classes to keep them"
        )

    # Class folders, empty ones included, as torchvision's find_classes lists them.
    class_ids = sorted({c for scan in scans.values() for c in scan.classes})
    files = {s: scan.files for s, scan in scans.items()}
    rejected = {s: scan.rejected for s, scan in scans.items()}
    keys = {s: _unique_keys(fs) for s, fs in files.items()}
    if val_fraction is not None:
        # Keys come from the whole tree, so a file keeps its key whichever split it lands in.
        files["train"], files["val"] = _split_by_fraction(files["train"], val_fraction, seed)
        keys["val"] = keys["train"]
        rejected["val"] = []
    return _Index(class_ids, files, keys, rejected)


class ImageFolderSource:
    """An image-folder tree as a Source (shards/types.py)."""

    dataset = "imagefolder"

    def __init__(
        self, root: str | None, val_fraction: float | None = None, seed: int = 0, allow_empty_classes: bool = False
    ) -> None:
        if not root:
            raise ImageFolderError("imagefolder needs --source: a folder of class folders")
        if not os.path.isdir(root):
            what = "is not a folder" if os.path.exists(root) else "does not exist"
            raise ImageFolderError(f"image folder {root} {what}")
        if val_fraction is not None and not 0 <= val_fraction < 1:
            raise ImageFolderError(f"val_fraction must be at least 0 (no val split) and below 1, not {val_fraction}")
        val_fraction = val_fraction or None  # 0 holds nothing out: the tree is all train, as without it
        self.root = os.path.abspath(root)
        self.val_fraction, self.seed, self.allow_empty_classes = val_fraction, seed, allow_empty_classes
        self._index: _Index | None = _index_tree(self.root, val_fraction, seed, allow_empty_classes)

    # The index of a large tree is big; spawned workers only read() by locator, so it stays home.
    def __getstate__(self) -> dict:
        return {
            "root": self.root,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "allow_empty_classes": self.allow_empty_classes,
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._index = None

    def _idx(self) -> _Index:
        if self._index is None:
            self._index = _index_tree(self.root, self.val_fraction, self.seed, self.allow_empty_classes)
        return self._index

    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(i, c, c) for i, c in enumerate(self._idx().class_ids)]

    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self._idx().files]

    def items(self, split: str) -> list[Item]:
        idx = self._idx()
        label = {c: i for i, c in enumerate(idx.class_ids)}
        keys = idx.keys[split]
        files = sorted(idx.files[split], key=lambda f: f.rel)
        return [Item(keys[f.rel], label[f.class_id], f.class_id, f.rel, (f.real,), f.size) for f in files]

    def read(self, item: Item) -> bytes:
        with open(item.locator[0], "rb") as f:
            return f.read()

    def quarantined(self, split: str) -> list[Quarantined]:
        return list(self._idx().rejected.get(split, []))
