"""Write one shard, or reuse it: the unit of work every runner runs in parallel.

After a shard's tar and index file are published, a small progress record
(`_progress/<name>.json`) is published too, holding its checksum, counts, quarantine list and
a fingerprint of what it was planned to hold. A rerun reuses every shard whose record matches
the plan and whose tar is there at the recorded size, and rewrites the rest; the bytes are a
pure function of the plan, so the result equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from shards.images import BadImage, pack
from shards.plan import ShardSpec
from shards.storage import Storage
from shards.types import Options, Quarantined, Source
from shards.writer import ShardWriter

PROGRESS_DIR = "_progress"


class BuildError(RuntimeError):
    """A problem that stops the build before or instead of writing anything wrong."""


@dataclass
class ShardRecord:
    name: str
    index_file: str
    split: str
    samples: int
    bytes: int
    sha256: str
    fingerprint: str
    seconds: float
    reused: bool = False
    quarantine: list[dict] = field(default_factory=list)

    def manifest_entry(self) -> dict:
        return {
            "name": self.name,
            "index": self.index_file,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }


def record_name(spec: ShardSpec) -> str:
    return f"{PROGRESS_DIR}/{spec.name}.json"


def _reusable(storage: Storage, spec: ShardSpec, fingerprint: str) -> ShardRecord | None:
    try:
        rec = ShardRecord(**json.loads(storage.read_bytes(record_name(spec))))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None
    if rec.fingerprint != fingerprint:
        return None
    try:
        if storage.size(spec.name) != rec.bytes or not storage.exists(spec.index_name):
            return None
    except FileNotFoundError:
        return None
    rec.reused = True
    return rec


def write_shard(source: Source, spec: ShardSpec, storage: Storage, options: Options, params: dict) -> ShardRecord:
    """Write (or reuse) one shard with its index and progress record. Safe to retry."""
    fingerprint = spec.fingerprint(params)
    done = _reusable(storage, spec, fingerprint)
    if done is not None:
        return done
    start = time.perf_counter()
    quarantine: list[dict] = []
    with storage.staging(spec.name) as tar_tmp, storage.staging(spec.index_name) as idx_tmp:
        with open(tar_tmp, "wb", buffering=1 << 20) as f:
            w = ShardWriter(f)
            for item in spec.items:
                try:
                    packed = pack(
                        source.read(item),
                        verify=options.verify,
                        max_side=options.max_side,
                        quality=options.jpeg_quality,
                        max_pixels=options.max_pixels,
                        keep_png=options.image_ext == "png",
                    )
                except BadImage as e:
                    quarantine.append(Quarantined(item.key, item.source, str(e)).to_json())
                    continue
                except OSError as e:
                    raise BuildError(f"{spec.name}: cannot read {item.source}: {e}") from e
                meta = {
                    "class": item.class_id,
                    "source": item.source,
                    "width": packed.width,
                    "height": packed.height,
                    "repaired": packed.repaired,
                }
                if packed.original_size:
                    meta["original_size"] = list(packed.original_size)
                w.add(item.key, packed.data, packed.ext, item.label, meta)
            w.close()
            size = w.offset
        with open(idx_tmp, "w") as f:
            f.write(w.index_text())
        # Index first: a tar is never visible without its index. The record goes last.
        storage.publish(spec.index_name, idx_tmp)
        storage.publish(spec.name, tar_tmp)
    rec = ShardRecord(
        spec.name, spec.index_name, spec.split, w.samples, size, w.sha256, fingerprint,
        round(time.perf_counter() - start, 3), False, quarantine,
    )  # fmt: skip
    storage.write_bytes_atomic(record_name(spec), json.dumps(asdict(rec)).encode())
    return rec
