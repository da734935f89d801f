"""Recheck a finished shard set against its manifest: `python -m shards verify PATH [--decode]`.

Each shard is read once, as a stream: the sha256 is computed on the bytes as they pass, the
tar members are walked at the same time and compared with the DALI index (names, offsets,
sizes) and the manifest's sample count, and with --decode every image is decoded.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass

from PIL import Image

from shards import dali_index
from shards.manifest import IMAGE_EXTS, read_manifest
from shards.storage import Storage


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what passes through it."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        self.sha.update(data)
        self.n += len(data)
        b[: len(data)] = data
        return len(data)


@dataclass
class ShardCheck:
    name: str
    problems: list[str]


def check_shard(storage: Storage, entry: dict, image_ext: str, decode: bool) -> ShardCheck:
    name, problems = entry["name"], []
    try:
        size = storage.size(name)
    except FileNotFoundError:
        return ShardCheck(name, ["missing"])
    if size != entry["bytes"]:
        problems.append(f"size {size} != manifest {entry['bytes']}")
    index = _read_index(storage, entry["index"], problems)
    members, sha256 = _read_tar(storage, name, decode, problems)
    if sha256 != entry["sha256"]:
        problems.append("sha256 mismatch")
    keys = {n.split(".", 1)[0] for n, _, _ in members}
    if len(keys) != entry["samples"]:
        problems.append(f"{len(keys)} samples in tar, manifest says {entry['samples']}")
    if index is not None:
        flat = [(n, o, s) for sample in index for _, o, s, n in sample]
        if flat != members:
            problems.append("index does not match the tar's members")
    return ShardCheck(name, problems)


def _read_index(storage: Storage, name: str, problems: list[str]) -> list | None:
    """The shard's index as members per sample, or None with the problem noted."""
    try:
        return dali_index.parse_members(storage.read_bytes(name).decode())
    except FileNotFoundError:
        problems.append("index missing")
    except ValueError as e:
        problems.append(f"index: {e}")
    return None


def _read_tar(storage: Storage, name: str, decode: bool, problems: list[str]) -> tuple[list[tuple[str, int, int]], str]:
    """One streaming pass over the tar: its (member, data offset, size) list and its sha256;
    with `decode`, every image is decoded too, and each that fails is noted."""
    members: list[tuple[str, int, int]] = []
    with storage.open(name) as raw:
        stream = _Hashing(raw)
        try:
            with tarfile.open(fileobj=io.BufferedReader(stream, 1 << 20), mode="r|") as tar:
                for m in tar:
                    members.append((m.name, m.offset_data, m.size))
                    if decode and m.name.rsplit(".", 1)[-1] in IMAGE_EXTS:
                        _check_decodes(m.name, tar.extractfile(m).read(), problems)
            while stream.read(1 << 20):  # hash the end-of-archive padding too
                pass
        except tarfile.TarError as e:
            problems.append(f"not a readable tar: {e}")
    return members, stream.sha.hexdigest()


def _check_decodes(member: str, data: bytes, problems: list[str]) -> None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as e:
        problems.append(f"{member}: undecodable: {e}")


def verify(root: str, decode: bool = False, progress=None) -> list[ShardCheck]:
    """Check every shard of every split; returns the checks (empty problems = good)."""
    storage = Storage(root)
    m = read_manifest(storage)
    checks = []
    for split in m["splits"].values():
        for entry in split["shards"]:
            checks.append(check_shard(storage, entry, m["image_ext"], decode))
            if progress:
                progress(checks[-1])
    return checks
