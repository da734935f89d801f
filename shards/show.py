"""Look at the data as stored: `python -m shards show PATH_OR_URL --output FILE.png`.

A seeded random pick of samples of one split, read by random access (each shard's DALI index
gives every member's offset, so only the chosen bytes are read, locally or from a bucket),
drawn as a grid: the image, its label and class name from the manifest, its key. Samples the
build repaired (CMYK, PNG-as-JPEG, ...) get a red frame with the repair named, and so does any
sample whose .cls label disagrees with its .json class id: the two places a label lives.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass

from PIL import Image

from shards.dali_index import parse_members
from shards.grid import image_grid
from shards.manifest import IMAGE_EXTS, ManifestError, read_manifest
from shards.storage import Storage


@dataclass
class StoredSample:
    key: str
    shard: str
    label: int
    meta: dict
    image: Image.Image | None  # None when it does not decode
    problem: str | None = None  # a reason to mark the cell, besides a repair


def pick(manifest: dict, split: str, count: int, seed: int) -> list[tuple[int, int]]:
    """(shard position in the split, sample position in the shard) of `count` distinct samples, seeded."""
    shards = manifest["splits"][split]["shards"]
    total = sum(s["samples"] for s in shards)
    chosen = sorted(random.Random(seed).sample(range(total), min(count, total)))
    out, start = [], 0
    for pos, s in enumerate(shards):
        out += [(pos, g - start) for g in chosen if start <= g < start + s["samples"]]
        start += s["samples"]
    return out


def _read_members(storage: Storage, shard: str, members: list[tuple[str, int, int, str]]) -> dict[str, bytes]:
    out = {}
    with storage.open(shard) as f:
        for ext, offset, size, _name in members:
            f.seek(offset)
            out[ext] = f.read(size)
    return out


def _sample(storage: Storage, shard: str, members: list, classes: list[dict]) -> StoredSample:
    parts = _read_members(storage, shard, members)
    key = members[0][3].split(".", 1)[0]
    label = int(parts.get("cls", b"-1"))
    meta = json.loads(parts.get("json", b"{}"))
    problem = None
    if not 0 <= label < len(classes):
        problem = f"label {label} outside 0..{len(classes) - 1}"
    elif meta.get("class") not in (None, classes[label]["id"]):
        problem = f"json class {meta.get('class')} != {classes[label]['id']}"
    data = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    try:
        with Image.open(io.BytesIO(data or b"")) as im:
            image = im.convert("RGB")
    except Exception as e:
        image, problem = None, f"undecodable: {type(e).__name__}"
    return StoredSample(key, shard, label, meta, image, problem)


def read_samples(path: str, split: str = "train", count: int = 32, seed: int = 0) -> tuple[list[StoredSample], dict]:
    """The picked samples of `split` under `path` (a folder or URL with manifest.json), and the manifest."""
    storage = Storage(path)
    m = read_manifest(storage)
    if split not in m["splits"]:
        raise ManifestError(f"{storage.shown}: no split {split!r} (has {sorted(m['splits'])})")
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    shards = m["splits"][split]["shards"]
    indexes: dict[int, list] = {}
    samples = []
    for pos, i in pick(m, split, count, seed):
        if pos not in indexes:
            indexes[pos] = parse_members(storage.read_bytes(shards[pos]["index"]).decode())
        samples.append(_sample(storage, shards[pos]["name"], indexes[pos][i], m["classes"]))
    return samples, m


def caption(s: StoredSample, classes: list[dict]) -> str:
    name = classes[s.label]["name"] if 0 <= s.label < len(classes) else "?"
    lines = [f"{name} ({s.label})", s.key]
    if s.meta.get("repaired"):
        lines.append(f"repaired: {s.meta['repaired']}")
    if s.problem:
        lines.append(s.problem)
    return "\n".join(lines)


def show(path: str, split: str = "train", count: int = 32, seed: int = 0, columns: int = 8, cell: int = 160):
    """The grid image (PIL) and the samples it shows."""
    samples, m = read_samples(path, split, count, seed)
    blank = Image.new("RGB", (cell, cell), (90, 90, 90))
    grid = image_grid(
        [s.image or blank for s in samples],
        [caption(s, m["classes"]) for s in samples],
        [bool(s.meta.get("repaired") or s.problem) for s in samples],
        columns=columns,
        cell=cell,
    )
    return grid, samples
