"""CIFAR-10 from the official cifar-10-python.tar.gz (or its extracted cifar-10-batches-py folder).

    cifar-10-batches-py/data_batch_1 .. data_batch_5   train: 5 x 10,000 images
    cifar-10-batches-py/test_batch                      val: 10,000 images
    cifar-10-batches-py/batches.meta                    label_names, in label order

Each batch is a pickle of {"data": uint8 array N x 3072 (1024 R, 1024 G, 1024 B values of a
32 x 32 image, row-major), "labels": [int], "filenames": [str], ...}. The pickles are read
with an unpickler that only builds numpy arrays and plain containers, so a doctored archive
cannot run code. The images are 32 x 32 and lossless, so they are stored as PNG by default
(the manifest's image_ext says so) or as high-quality JPEG on request.

The arrays (180 MB) are loaded once per process, on first use, and never pickled: the source
object goes to spawned workers as its path and options alone.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from shards.checksums import verify_md5
from shards.types import ClassInfo, Item, Options, Quarantined

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
META = "batches.meta"
# The official label order; it happens to be alphabetical, so labels are also sorted-id indexes.
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PNG_LEVEL = 6  # fixed, so PNG bytes are reproducible
APPROX_BYTES = {"png": 2400, "jpg": 1600}  # per 32 x 32 image, for planning shards by bytes


class Cifar10Error(ValueError):
    """The archive is missing, damaged or not CIFAR-10; the message is one line."""


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and builtins only: a pickle is code, and the archive may not be the official one."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _unpickle(raw: bytes, what: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as e:  # pickle raises many types on garbage
        raise Cifar10Error(f"{what} is not a CIFAR-10 pickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise Cifar10Error(f"{what} is not a CIFAR-10 pickle: holds a {type(obj).__name__}, not a dict")
    # Python 2 pickles may come back with bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


@dataclass(frozen=True)
class _Split:
    images: np.ndarray  # N x 32 x 32 x 3 uint8
    labels: list[int]
    rows: list[tuple[str, int]]  # (batch member, row in it) per image, for the sample's source


@dataclass(frozen=True)
class _Data:
    label_names: list[str]
    splits: dict[str, _Split]


def _read_members(path: str) -> dict[str, bytes]:
    """The meta and batch pickles' bytes, from the tar.gz or the extracted folder."""
    wanted = [META] + [b for names in BATCHES.values() for b in names]
    out: dict[str, bytes] = {}
    if os.path.isdir(path):
        for name in wanted:
            p = os.path.join(path, name)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    out[name] = f.read()
    else:
        try:
            with tarfile.open(path, "r:gz" if path.endswith((".gz", ".tgz")) else "r:") as tf:
                for info in tf:
                    base = info.name.rsplit("/", 1)[-1]
                    if info.isreg() and base in wanted and base not in out:
                        f = tf.extractfile(info)
                        assert f is not None
                        out[base] = f.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise Cifar10Error(f"{path} is not a readable tar.gz: {type(e).__name__}: {e}") from None
    missing = [n for n in wanted if n not in out]
    if missing:
        raise Cifar10Error(f"{path} is not cifar-10-python: no {', '.join(missing)} in it")
    return out


def _load(path: str) -> _Data:
    raw = _read_members(path)
    meta = _unpickle(raw[META], META)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if tuple(names) != LABEL_NAMES:
        raise Cifar10Error(f"{path}: batches.meta label_names are {names}, not CIFAR-10's {list(LABEL_NAMES)}")
    splits = {}
    for split, batches in BATCHES.items():
        images, labels, rows = [], [], []
        for b in batches:
            d = _unpickle(raw.pop(b), b)  # pop: free each batch's bytes once unpickled
            data, lab = d.get("data"), d.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise Cifar10Error(f"{path}: {b} has no uint8 N x 3072 'data' array")
            if not isinstance(lab, list) or len(lab) != len(data):
                raise Cifar10Error(f"{path}: {b} has {len(data)} images but not as many labels")
            if any(not isinstance(x, int) or not 0 <= x < len(LABEL_NAMES) for x in lab):
                raise Cifar10Error(f"{path}: {b} holds a label outside 0..{len(LABEL_NAMES) - 1}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += lab
            rows += [(b, r) for r in range(len(data))]
        splits[split] = _Split(np.ascontiguousarray(np.concatenate(images)), labels, rows)
    return _Data(names, splits)


# One loaded archive per process: workers run many shards each, and should read it once.
_CACHE: dict[tuple, _Data] = {}


def _cached(path: str) -> _Data:
    try:
        st = os.stat(path)
    except OSError as e:
        raise Cifar10Error(f"cannot read {path}: {e.strerror}") from None
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _load(path)
    return _CACHE[key]


def _find(path: str) -> str:
    """The archive (or extracted folder) that `path` names or holds."""
    if os.path.isdir(path):
        for candidate in (os.path.join(path, ARCHIVE), os.path.join(path, FOLDER)):
            if os.path.exists(candidate):
                return candidate
        if os.path.isfile(os.path.join(path, META)):
            return path  # the extracted folder itself
        raise Cifar10Error(f"{path} holds neither {ARCHIVE} nor {FOLDER}/")
    if not os.path.exists(path):
        raise Cifar10Error(f"CIFAR-10 source {path} does not exist")
    return path


class Cifar10Source:
    """CIFAR-10 as a Source (shards/types.py). Splits: train (50,000) and val (the 10,000 test_batch images)."""

    dataset = "cifar10"

    def __init__(
        self,
        path: str | None,
        image_ext: str = "png",
        jpeg_quality: int = Options.jpeg_quality,
        md5: dict[str, str] | None = None,
    ) -> None:
        if not path:
            raise Cifar10Error(f"cifar10 needs --source: {ARCHIVE} or a folder holding it")
        image_ext = {"jpeg": "jpg"}.get(image_ext, image_ext)
        if image_ext not in APPROX_BYTES:
            raise Cifar10Error(f"cifar10 stores png or jpg, not {image_ext!r}")
        if not 1 <= jpeg_quality <= 100:
            raise Cifar10Error(f"jpeg_quality must be 1..100, not {jpeg_quality}")
        self.path = os.path.abspath(_find(str(path)))
        if md5 and os.path.basename(self.path) in md5:  # an explicit --md5 is checked
            verify_md5(self.path, md5[os.path.basename(self.path)])
        self.image_ext = image_ext  # what the build should record as the manifest's image_ext
        self.jpeg_quality = jpeg_quality

    def _data(self) -> _Data:
        return _cached(self.path)

    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(i, n, n) for i, n in enumerate(self._data().label_names)]

    def splits(self) -> list[str]:
        return list(BATCHES)

    def items(self, split: str) -> list[Item]:
        s = self._data().splits[split]
        names = self._data().label_names
        size = APPROX_BYTES[self.image_ext]
        width = max(5, len(str(len(s.labels) - 1)))
        return [
            Item(f"cifar10_{split}_{i:0{width}d}", lab, names[lab], f"{FOLDER}/{b}#{r}", (split, i), size)
            for i, (lab, (b, r)) in enumerate(zip(s.labels, s.rows))
        ]

    def read(self, item: Item) -> bytes:
        split, i = item.locator
        img = Image.fromarray(self._data().splits[split].images[i], "RGB")
        buf = io.BytesIO()
        if self.image_ext == "png":
            img.save(buf, format="PNG", compress_level=PNG_LEVEL, optimize=False)
        else:
            # 4:4:4: at 32 x 32 every chroma sample matters.
            img.save(buf, format="JPEG", quality=self.jpeg_quality, subsampling=0)
        return buf.getvalue()

    def quarantined(self, split: str) -> list[Quarantined]:
        return []
