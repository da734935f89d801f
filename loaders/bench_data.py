"""Data for `python -m loaders.bench`: shards from a folder of photos, and the same images as an ImageFolder.

The benchmark set is built by the project's own writer (shards/build.py) from real photos
(for example 100 ImageNet photos, one per class), each repeated `copies`
times so an epoch is long enough to measure. The ImageFolder baseline reads the very same
JPEG bytes, extracted from the shards into <root>/<label>/<key>.jpg.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from loaders.spec import IMAGE_EXTS, open_binary, open_shards
from shards.build import build
from shards.manifest import LABEL_BYTES, decode_label
from shards.types import ClassInfo, Item, Options, Quarantined

PHOTO_EXTS = (".jpeg", ".jpg", ".png")


class PhotoFolderSource:
    """Photos named n<wnid>_<words>.<ext> in one folder, one class per wnid, repeated `copies` times (split train)."""

    dataset = "bench"

    def __init__(self, folder: str | os.PathLike, copies: int) -> None:
        self.photos = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PHOTO_EXTS)
        if not self.photos:
            raise ValueError(f"{folder}: no .jpeg/.jpg/.png photos")
        self.wnids = sorted({p.stem.split("_", 1)[0] for p in self.photos})
        self.copies = copies

    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(i, w, w) for i, w in enumerate(self.wnids)]

    def splits(self) -> list[str]:
        return ["train"]

    def items(self, split: str) -> list[Item]:
        out = []
        for c in range(self.copies):
            for p in self.photos:
                wnid = p.stem.split("_", 1)[0]
                key = f"{p.stem}_{c}".replace(".", "_")
                out.append(Item(key, self.wnids.index(wnid), wnid, p.name, (str(p),), p.stat().st_size))
        return out

    def read(self, item: Item) -> bytes:
        return Path(item.locator[0]).read_bytes()

    def quarantined(self, split: str) -> list[Quarantined]:
        return []


def build_bench_shards(photos: str, out: str, copies: int, shard_samples: int, workers: int = 2) -> dict:
    return build(PhotoFolderSource(photos, copies), out, Options(seed=0, shard_samples=shard_samples), workers=workers)


def extract_imagefolder(spec: str, split: str, dest: str | os.PathLike) -> int:
    """Write every image of the shards to dest/<label>/<key>.<ext>; returns the number written."""
    shards, _ = open_shards(spec, split=split)
    n = 0
    for shard in tqdm(shards, desc="extract ImageFolder", unit="shard"):
        idx, keys = shard.index(), shard.keys()
        with open_binary(shard.url) as f:
            for i in range(len(idx)):
                f.seek(int(idx.label_offset[i]))
                label = decode_label(f.read(LABEL_BYTES))
                f.seek(int(idx.image_offset[i]))
                data = f.read(int(idx.image_size[i]))
                name = f"{keys[i]}.{IMAGE_EXTS[idx.image_ext[i]]}"
                folder = Path(dest) / f"{label:05d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
                n += 1
    return n
