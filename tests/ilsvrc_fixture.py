"""A small ILSVRC2012-layout fixture built from real photos, with the traps of the real thing.

    root/ILSVRC2012_img_train.tar        tar of per-class tars n<wnid>.tar holding n<wnid>_<num>.JPEG
    root/ILSVRC2012_img_val.tar          ILSVRC2012_val_<num>.JPEG in shuffled (non-alphabetical) order
    root/ILSVRC2012_devkit_t12.tar.gz    data/meta.mat (scipy.io.savemat, the structure torchvision
                                         reads: ILSVRC2012_IDs not in sorted-wnid order, non-leaf rows
                                         mixed in) and data/ILSVRC2012_validation_ground_truth.txt

Planted inputs: a CMYK JPEG, a PNG named .JPEG and a grayscale JPEG (kept: the first two are
repaired, the third stays as it is); a truncated JPEG and an empty file (quarantined); and,
with unsafe=True, members named with '../', an absolute path, a symlink and a hard link
(quarantined, never followed). The same call with unsafe=False writes the same good images
and labels without the unsafe members, which is what torchvision's extracting reference can
safely be pointed at (Python 3.11's tarfile.extractall follows '../' names).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

PHOTO_DIR = Path(__file__).parent / "data" / "photos"
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
MTIME = 1325376000
NON_LEAF = [("n00001740", "entity"), ("n00021939", "artifact, artefact"), ("n99999999", "zzz, last non-leaf")]


def _tarinfo(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime, info.mode = size, kind, linkname, MTIME, 0o644
    return info


def _tar_bytes(members: list[tuple[str, bytes | None, bytes, str]]) -> bytes:
    """members: (name, data, type, linkname); data None for links."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data, kind, link in members:
            if data is None:
                tf.addfile(_tarinfo(name, 0, kind, link))
            else:
                tf.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _load_photos(photo_dir: Path, max_side: int | None) -> list[tuple[str, bytes, Image.Image]]:
    """(wnid, JPEG bytes, decoded RGB image) per photo; shrunk to max_side unless None."""
    out = []
    for p in sorted(photo_dir.glob("*.JPEG")):
        wnid = p.stem.split("_", 1)[0]
        if max_side is None:
            raw = p.read_bytes()
            img = Image.open(io.BytesIO(raw))
            img.draft("RGB", (img.width // 4, img.height // 4))  # only for the planted variants
            out.append((wnid, raw, img.convert("RGB")))
        else:
            img = Image.open(p).convert("RGB")
            img.thumbnail((max_side, max_side))
            out.append((wnid, _jpeg(img), img))
    return out


def _meta_mat(leaves: list[tuple[int, str, str]], rng: random.Random) -> bytes:
    """meta.mat with a 'synsets' struct array in the official field order; rows shuffled."""
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = [(i, w, words, f"gloss of {words}", 0, np.zeros((0,), np.float64), 0, 10) for i, w, words in leaves]
    leaf_ids = np.array([i for i, _, _ in leaves], np.float64)
    for j, (w, words) in enumerate(NON_LEAF):
        rows.append((len(leaves) + 1 + j, w, words, "a non-leaf synset", len(leaves), leaf_ids, 2 + j, 0))
    rng.shuffle(rows)
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for r, row in enumerate(rows):
        for f, v in zip(fields, row):
            synsets[r, 0][f] = v
    buf = io.BytesIO()
    sio.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def _devkit(meta: bytes, truth_ids: list[int]) -> bytes:
    top = "ILSVRC2012_devkit_t12"
    truth = "".join(f"{i}\n" for i in truth_ids).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for d in (top, f"{top}/data"):
            tf.addfile(_tarinfo(d, 0, tarfile.DIRTYPE))
        tf.addfile(_tarinfo(f"{top}/data/meta.mat", len(meta)), io.BytesIO(meta))
        name = f"{top}/data/ILSVRC2012_validation_ground_truth.txt"
        tf.addfile(_tarinfo(name, len(truth)), io.BytesIO(truth))
    return gzip.compress(buf.getvalue(), mtime=0)


def make_ilsvrc(
    root: Path,
    classes: int = 5,
    per_class: int = 4,
    val_per_class: int = 2,
    photo_dir: Path = PHOTO_DIR,
    max_side: int | None = 96,
    unsafe: bool = True,
    seed: int = 0,
) -> dict:
    """Write the three archives into `root`; return what a correct reader must find.

    Returns {"wnids": sorted leaf wnids, "train"/"val": {key: expected label} for every good
    image (planted repairable ones included), "repaired": {split: {key: "cmyk"|"png"}},
    "gray": [keys of grayscale JPEGs], "bad": [{"split", "key", "source", "kind"}],
    "md5": {archive name: hex}, "escape_names": file names the unsafe members would create}.
    """
    if classes < 3:
        raise ValueError("make_ilsvrc needs at least 3 classes to plant its bad members")
    root.mkdir(parents=True, exist_ok=True)
    # One generator per purpose, so unsafe=False draws the same keys, labels and orders.
    rng = random.Random(f"{seed}:ids")
    photos = _load_photos(photo_dir, max_side)
    wnids_seen = list(dict.fromkeys(w for w, _, _ in photos))
    if classes > len(wnids_seen):
        raise ValueError(f"only {len(wnids_seen)} distinct wnids among the photos in {photo_dir}")
    class_wnids = wnids_seen[:classes]
    # Photo names are n<wnid>_<words>.JPEG: "n01440764_tench" -> "tench, n01440764".
    words = {p.stem.split("_", 1)[0]: p.stem.split("_", 1)[-1].replace("_", " ") for p in photo_dir.glob("*.JPEG")}
    wnids = sorted(class_wnids)
    label = {w: i for i, w in enumerate(wnids)}
    # ILSVRC2012_IDs in an order unrelated to sorted wnids (the real tench: ID 449, label 0).
    ids = list(range(1, classes + 1))
    rng.shuffle(ids)
    if classes > 1 and ids == sorted(ids):
        ids.reverse()
    wnid_to_id = dict(zip(wnids, ids))
    leaves = [(wnid_to_id[w], w, f"{words[w]}, {w}") for w in wnids]

    result: dict = {"wnids": wnids, "train": {}, "val": {}, "repaired": {"train": {}, "val": {}}, "gray": [], "bad": []}
    pick = iter(range(10**9))

    def photo() -> tuple[bytes, Image.Image]:
        _, raw, img = photos[next(pick) % len(photos)]
        return raw, img

    def planted(kind: str) -> bytes:
        raw, img = photo()
        if kind == "cmyk":
            return _jpeg(img.convert("CMYK"))
        if kind == "png":
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
        if kind == "gray":
            return _jpeg(img.convert("L"))
        if kind == "truncated":
            return raw[: len(raw) // 2]
        return b""  # empty

    # -- train: one inner tar per class ---------------------------------------------------------
    plan = {0: ["cmyk", "truncated"], 1: ["png", "empty"], 2: ["gray"]}
    outer: list[tuple[str, bytes | None, bytes, str]] = []
    for c, w in enumerate(class_wnids):
        crng = random.Random(f"{seed}:class:{c}")
        nums = crng.sample(range(1, 30000), per_class + 3)
        members: list[tuple[str, bytes | None, bytes, str]] = []
        for j in range(per_class):
            key = f"{w}_{nums[j]}"
            members.append((f"{key}.JPEG", photo()[0], tarfile.REGTYPE, ""))
            result["train"][key] = label[w]
        for j, kind in enumerate(plan.get(c, [])):
            key = f"{w}_{nums[per_class + j]}"
            members.append((f"{key}.JPEG", planted(kind), tarfile.REGTYPE, ""))
            if kind in ("cmyk", "png"):
                result["train"][key] = label[w]
                result["repaired"]["train"][key] = kind
            elif kind == "gray":
                result["train"][key] = label[w]
                result["gray"].append(key)
            else:
                result["bad"].append({"split": "train", "key": key, "source": f"{w}.tar/{key}.JPEG", "kind": kind})
        if unsafe and c == 0:
            first = members[0][0]
            for name, kind, link, what in [
                ("../escape_train.JPEG", tarfile.REGTYPE, "", "dotdot"),
                ("/shardline_escape_abs.JPEG", tarfile.REGTYPE, "", "absolute"),
                (f"{w}_link.JPEG", tarfile.SYMTYPE, "/etc/passwd", "symlink"),
                (f"{w}_hard.JPEG", tarfile.LNKTYPE, first, "hardlink"),
            ]:
                data = None if kind != tarfile.REGTYPE else photos[0][1]
                members.append((name, data, kind, link))
                result["bad"].append({"split": "train", "key": None, "source": f"{w}.tar/{name}", "kind": what})
        crng.shuffle(members)
        outer.append((f"{w}.tar", _tar_bytes(members), tarfile.REGTYPE, ""))
    if unsafe:
        escape = _tar_bytes([("escape_inner.JPEG", photos[0][1], tarfile.REGTYPE, "")])
        outer.append(("../escape_outer.tar", escape, tarfile.REGTYPE, ""))
        result["bad"].append({"split": "train", "key": None, "source": "../escape_outer.tar", "kind": "dotdot"})
    (root / TRAIN_TAR).write_bytes(_tar_bytes(outer))

    # -- val: flat, shuffled member order, labels only in the devkit ------------------------------
    n_val = classes * val_per_class
    vrng = random.Random(f"{seed}:val")
    val_classes = [class_wnids[i % classes] for i in range(n_val)]
    vrng.shuffle(val_classes)
    val_kinds = {1: "cmyk", 2: "truncated", 3: "empty"}  # by val image number
    val_members: list[tuple[str, bytes | None, bytes, str]] = []
    for i, w in enumerate(val_classes, 1):
        key = f"ILSVRC2012_val_{i:08d}"
        kind = val_kinds.get(i) if n_val > 4 else None
        data = planted(kind) if kind else photo()[0]
        val_members.append((f"{key}.JPEG", data, tarfile.REGTYPE, ""))
        if kind in ("truncated", "empty"):
            result["bad"].append({"split": "val", "key": key, "source": f"{key}.JPEG", "kind": kind})
        else:
            result["val"][key] = label[w]
            if kind:
                result["repaired"]["val"][key] = kind
    if unsafe:
        val_members.append(("../escape_val.JPEG", photos[0][1], tarfile.REGTYPE, ""))
        val_members.append(("ILSVRC2012_val_link.JPEG", None, tarfile.SYMTYPE, "/etc/passwd"))
        result["bad"].append({"split": "val", "key": None, "source": "../escape_val.JPEG", "kind": "dotdot"})
        result["bad"].append({"split": "val", "key": None, "source": "ILSVRC2012_val_link.JPEG", "kind": "symlink"})
    vrng.shuffle(val_members)
    if [m[0] for m in val_members] == sorted(m[0] for m in val_members):
        val_members.reverse()
    (root / VAL_TAR).write_bytes(_tar_bytes(val_members))

    # -- devkit ----------------------------------------------------------------------------------
    truth = [wnid_to_id[w] for w in val_classes]  # line i: val image i, alphabetical order
    (root / DEVKIT).write_bytes(_devkit(_meta_mat(leaves, random.Random(f"{seed}:meta")), truth))

    result["md5"] = {n: hashlib.md5((root / n).read_bytes()).hexdigest() for n in (TRAIN_TAR, VAL_TAR, DEVKIT)}
    result["escape_names"] = ["escape_train.JPEG", "shardline_escape_abs.JPEG", "escape_outer.tar", "escape_val.JPEG"]
    return result
