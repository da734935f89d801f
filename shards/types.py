"""The few types every part of shards/ shares.

A source turns a dataset on disk (or behind a URL) into a list of `Item`s per split: cheap
references that say where an image's bytes are, never the bytes themselves, so that the
index of 1.28M ImageNet images stays a few hundred MB and any item can be read by any worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ClassInfo:
    index: int  # label: position in the sorted list of class ids
    id: str  # wnid for ImageNet, folder name for image folders
    name: str  # human-readable name ("tench"); equals id where none is known


@dataclass(frozen=True, slots=True)
class Item:
    """Where one image lives, and what it is labelled.

    `locator` is the source's own, opaque address of the bytes, kept as plain strings and
    ints so items pickle cheaply to worker processes: for tar members (path, offset, size);
    for files (path,); for in-memory sets such as CIFAR-10 (path, row).
    """

    key: str  # sample key inside the shard: the source file's stem, dots replaced
    label: int
    class_id: str
    source: str  # original member path, recorded in the sample's json
    locator: tuple = ()
    size: int = 0  # approximate byte size, for planning shards by bytes


@dataclass(frozen=True, slots=True)
class Quarantined:
    key: str
    source: str
    reason: str

    def to_json(self) -> dict:
        return {"key": self.key, "source": self.source, "reason": self.reason}


class Source(Protocol):
    """One dataset kind. Implementations live in shards/sources/."""

    dataset: str  # name used in shard file names: imagenet, cifar10, ...

    def classes(self) -> list[ClassInfo]: ...

    def splits(self) -> list[str]: ...

    def items(self, split: str) -> list[Item]:
        """Every image of the split, in a deterministic order (the plan shuffles them)."""
        ...

    def read(self, item: Item) -> bytes:
        """The image's bytes as stored in the source (may raise OSError)."""
        ...

    def quarantined(self, split: str) -> list[Quarantined]:
        """Members rejected while indexing (unsafe names, links, empty), never read."""
        ...


# PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 1024**3 // 4 // 3): the default
# --max-pixels. Larger images are quarantined (shards/images.py).
DEFAULT_MAX_PIXELS = 1024**3 // 4 // 3


@dataclass
class Options:
    """Build options that change the bytes written; all of them go to manifest params."""

    seed: int = 0
    shard_bytes: int = 1_000_000_000
    shard_samples: int | None = None  # wins over shard_bytes when set
    verify: str = "decode"  # none | header | decode
    max_side: int | None = None
    image_ext: str = "jpg"  # jpg or png (png only for lossless sources like CIFAR-10)
    jpeg_quality: int = 95  # for re-encoded (repaired, resized, lossless-source) images
    max_pixels: int = DEFAULT_MAX_PIXELS  # images with more pixels are quarantined
    extra: dict = field(default_factory=dict)  # source-specific params, recorded verbatim

    def params(self) -> dict:
        p = {
            "seed": self.seed,
            "shard_size": self.shard_bytes if self.shard_samples is None else None,
            "shard_samples": self.shard_samples,
            "verify": self.verify,
            "max_side": self.max_side,
            "jpeg_quality": self.jpeg_quality,
            "max_pixels": self.max_pixels,
        }
        p.update(self.extra)
        return p
