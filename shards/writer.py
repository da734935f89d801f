"""Write one shard: a deterministic tar, its DALI index and its sha256, in one pass.

Headers are built with tarfile.TarInfo but the bytes are streamed by hand, so the offset of
every member is known as it is written (the DALI index needs it) and the sha256 is computed
on the same bytes that go to disk, without reading the file back.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from shards import dali_index
from shards.manifest import LABEL_EXT, encode_label

BLOCK = 512
RECORD = 20 * BLOCK  # GNU tar pads archives to whole 10 KiB records
MTIME = 1325376000  # 2012-01-01T00:00:00Z: fixed so the same input gives the same bytes
MEMBERS = 4  # per sample: image, .cls, .label, .json (add() below)
# A sample's tar bytes beyond its image's: a 512 B header per member, one block each for the
# three small members (label text, 8-byte label, metadata json: all under 512 B), and the
# image's padding to a whole block, half a block on average: 3840 B. (Measured: a 200-sample
# demo shard is 3866 B a sample beyond its JPEG bytes, the tar's end and record padding included.)
SAMPLE_OVERHEAD = MEMBERS * BLOCK + (MEMBERS - 1) * BLOCK + BLOCK // 2
# A shard's: the end-of-archive blocks and, at most, a whole record of padding after them.
SHARD_OVERHEAD = 2 * BLOCK + RECORD


@dataclass
class ShardWriter:
    """Streams samples into an open binary file. Call `close()` to finish the tar."""

    out: BinaryIO
    sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    offset: int = 0
    index_lines: list[str] = field(default_factory=list)
    samples: int = 0

    def _emit(self, data: bytes) -> None:
        self.out.write(data)
        self.sha.update(data)
        self.offset += len(data)

    def _member(self, name: str, data: bytes) -> tuple[str, int, int, str]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = MTIME
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        header = info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")
        self._emit(header)
        data_offset = self.offset
        self._emit(data)
        pad = -len(data) % BLOCK
        if pad:
            self._emit(b"\0" * pad)
        ext = name.split(".", 1)[1]
        return ext, data_offset, len(data), name

    def add(self, key: str, image: bytes, image_ext: str, label: int, meta: dict) -> None:
        """Write one sample: image, ASCII label, binary label, json; always in this order."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"bad sample key {key!r}: keys hold no dots or slashes")
        members = [
            (f"{key}.{image_ext}", image),
            (f"{key}.cls", str(label).encode()),
            (f"{key}.{LABEL_EXT}", encode_label(label)),
            (f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
        ]
        parts = [self._member(n, d) for n, d in members]
        self.index_lines.append(dali_index.member_fields(parts))
        self.samples += 1

    def close(self) -> None:
        self._emit(b"\0" * (2 * BLOCK))  # end-of-archive marker
        pad = -self.offset % RECORD
        if pad:
            self._emit(b"\0" * pad)

    def index_text(self) -> str:
        """The DALI webdataset index (format v1.2, as nvidia.dali's wds2idx writes it)."""
        return dali_index.index_text(self.index_lines)

    @property
    def sha256(self) -> str:
        return self.sha.hexdigest()
