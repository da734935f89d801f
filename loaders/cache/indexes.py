"""A cached `.idx` checked before it is trusted: against the manifest, its own shape, and its tar.

The reader seeks by the index's offsets, so a damaged index reads wrong bytes as an image.
- When the manifest records the index's size and sha256 (`index_bytes`, `index_sha256`), its
  download is checked like a tar's (loaders/cache/download.py).
- Always, once downloaded: it parses as a v1.2 index (shards/dali_index.py), and every member's
  bytes lie inside the tar, on a 512-byte block, in order, without overlap.
- Once its tar has landed (and its sha256 matched): every member's tar header, the 512 bytes
  before its data, names that member and its size. A mismatch fails in one line naming the index.
"""

from __future__ import annotations

from loaders.cache.errors import CacheError
from shards.dali_index import IndexFormatError, parse_members

BLOCK = 512


def check_shape(text: str, tar_size: int, shown: str) -> None:
    """The index parses, and its members tile the tar (inside it, block-aligned, in order)."""
    try:
        samples = parse_members(text)
    except IndexFormatError as e:
        raise CacheError(f"{shown}: damaged index: {e}") from None
    end = 0
    for k, members in enumerate(samples):
        for _ext, offset, size, name in members:
            if offset % BLOCK or offset < end + BLOCK or offset + size > tar_size:
                raise CacheError(
                    f"{shown}: damaged index: sample {k} member {name} at {offset}+{size} does not fit "
                    f"the tar ({tar_size} bytes, previous member ending at {end})"
                )
            end = offset + size


def check_against_tar(index_path: str, tar_path: str, shown: str) -> None:
    """Each member's tar header (the block before its data) names it and gives its size."""
    with open(index_path) as f:
        samples = parse_members(f.read())
    with open(tar_path, "rb") as tar:
        for k, members in enumerate(samples):
            for _ext, offset, size, name in members:
                tar.seek(offset - BLOCK)
                header = tar.read(BLOCK)
                field = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                full = f"{prefix}/{field}" if prefix else field
                try:
                    recorded = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
                except ValueError:
                    recorded = -1
                if recorded != size or (len(name) <= 100 and full != name):
                    raise CacheError(
                        f"{shown}: damaged index: sample {k} says {name} ({size} bytes) at {offset}, "
                        f"the tar has {full!r} ({recorded} bytes) there"
                    )
