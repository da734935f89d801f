"""Shards as a reader sees them: SPEC -> shard list with sample counts, and each shard's index.

The DALI index (v1.2) written beside every tar gives, per sample, the offset and size of each
member. Both backends plan their reads from it: the pytorch backend reads image bytes by
(offset, size), the DALI backend writes per-epoch sub-indexes over the same tars. Only the
numbers are kept in memory (numpy, about 25 bytes a sample); sample keys are read back from
the index file when an error message needs one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import fsspec
import numpy as np

from shards.manifest import LABEL_EXT, ManifestError, resolve_spec
from shards.storage import is_url

IMAGE_EXTS = ("jpg", "png")  # DESIGN.md section 2: every reader accepts both


def open_binary(url: str):
    """Open a local path or fsspec URL for binary reading."""
    if is_url(url):
        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def read_text(url: str) -> str:
    with open_binary(url) as f:
        return f.read().decode()


@dataclass
class SampleIndex:
    """Per-sample member offsets of one shard, parsed from its .idx."""

    image_ext: np.ndarray  # uint8: index into IMAGE_EXTS
    image_offset: np.ndarray  # int64
    image_size: np.ndarray  # int64
    label_offset: np.ndarray  # int64 (the fixed-width binary label member)

    def __len__(self) -> int:
        return len(self.image_offset)


@dataclass
class Shard:
    url: str
    index_url: str  # a local copy's path once a remote set's index is cached (loaders/cache.py)
    samples: int
    bytes: int | None = None  # from the manifest, when there is one
    sha256: str | None = None
    _index: SampleIndex | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def index(self) -> SampleIndex:
        if self._index is None:
            self._index = parse_index(read_text(self.index_url), self.index_url)
            if len(self._index) != self.samples:
                raise ManifestError(
                    f"{self.index_url}: index lists {len(self._index)} samples, manifest says {self.samples}"
                )
        return self._index

    def key(self, i: int) -> str:
        """The key of sample i (read from the index file again: keys are not kept in memory)."""
        line = read_text(self.index_url).splitlines()[1 + i]
        return line.split()[3].split(".", 1)[0]


def index_count(text_head: str, url: str) -> int:
    parts = text_head.split("\n", 1)[0].split()
    if len(parts) != 2 or parts[0] != "v1.2" or not parts[1].isdigit():
        raise ManifestError(f"{url}: not a DALI v1.2 index (first line {text_head[:40]!r})")
    return int(parts[1])


def parse_index(text: str, url: str) -> SampleIndex:
    lines = text.splitlines()
    n = index_count(lines[0] if lines else "", url)
    ext = np.zeros(n, np.uint8)
    img_off, img_size, lab_off = (np.zeros(n, np.int64) for _ in range(3))
    if len(lines) - 1 != n:
        raise ManifestError(f"{url}: header says {n} samples but {len(lines) - 1} lines follow")
    for i, line in enumerate(lines[1:]):
        t = line.split()
        found_img = found_lab = False
        for j in range(0, len(t) - 3, 4):
            e = t[j]
            if e in IMAGE_EXTS and not found_img:
                ext[i], img_off[i], img_size[i] = IMAGE_EXTS.index(e), int(t[j + 1]), int(t[j + 2])
                found_img = True
            elif e == LABEL_EXT:
                lab_off[i] = int(t[j + 1])
                found_lab = True
        if not (found_img and found_lab):
            key = t[3].split(".", 1)[0] if len(t) > 3 else "?"
            raise ManifestError(f"{url}: sample {key} lacks a .jpg/.png image or a .{LABEL_EXT} label member")
    return SampleIndex(ext, img_off, img_size, lab_off)


def open_shards(spec, split: str = "train") -> tuple[list[Shard], dict | None]:
    """SPEC (brace pattern, list, folder with manifest.json, s3:// URLs) -> shards with counts.

    Counts come from the manifest when there is one beside the shards, else from each
    index's first line ("v1.2 N").
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    refs, manifest = resolve_spec(spec, split=split)
    recorded = {e["name"]: e for sp in (manifest or {}).get("splits", {}).values() for e in sp["shards"]}
    shards = []
    for r in refs:
        if r.index_url is None:
            raise ManifestError(f"{r.url}: not a .tar shard (no .idx beside it)")
        samples = r.samples
        if samples is None:
            try:
                with open_binary(r.index_url) as f:
                    samples = index_count(f.readline().decode(), r.index_url)
            except FileNotFoundError:
                raise ManifestError(f"{r.index_url}: index missing (build shards with shardline)") from None
        rec = recorded.get(r.url.rsplit("/", 1)[-1], {})
        shards.append(Shard(r.url, r.index_url, samples, rec.get("bytes"), rec.get("sha256")))
    if sum(s.samples for s in shards) == 0:
        raise ManifestError(f"{spec}: the shards hold no samples")
    return shards, manifest
