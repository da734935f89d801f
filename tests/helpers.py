"""Small shared test helpers: a source over the real photos in tests/data, and a shard builder."""

from __future__ import annotations

from pathlib import Path

from shards.build import build
from shards.types import ClassInfo, Item, Options, Quarantined

PHOTOS = sorted((Path(__file__).parent / "data" / "photos").glob("*.JPEG"))


class PhotoSource:
    """The test photos, repeated `copies` times, labelled round-robin into `num_classes` classes.

    Splits: train and val. A plain Source (shards/types.py), so shards built from it go
    through the real writer, index and manifest code.
    """

    dataset = "photos"

    def __init__(self, num_classes: int = 4, copies: int = 2, val_copies: int = 1) -> None:
        self.num_classes, self.copies, self.val_copies = num_classes, copies, val_copies

    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(i, f"c{i}", f"class {i}") for i in range(self.num_classes)]

    def splits(self) -> list[str]:
        return ["train", "val"]

    def items(self, split: str) -> list[Item]:
        copies = self.copies if split == "train" else self.val_copies
        out = []
        for c in range(copies):
            for i, p in enumerate(PHOTOS):
                label = i % self.num_classes
                out.append(Item(f"{split}_{c}_{p.stem}", label, f"c{label}", p.name, (str(p),), p.stat().st_size))
        return out

    def read(self, item: Item) -> bytes:
        return Path(item.locator[0]).read_bytes()

    def quarantined(self, split: str) -> list[Quarantined]:
        return []


def build_photo_shards(out: Path, shard_samples: int = 7, **kw) -> dict:
    """Build uneven shards (shard_samples does not divide the count) from the test photos."""
    source = PhotoSource(**kw)
    return build(source, str(out), Options(seed=1, shard_samples=shard_samples), workers=1)
