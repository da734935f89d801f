"""MD5 of archives: the official ImageNet digests, chunked hashing with a progress bar.

ImageNet publishes MD5s (not SHA-256) for its archives, so MD5 is what can be checked before
a 150 GB read. Kept apart from the sources so the download code can reuse it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping

# The digests published with ILSVRC2012 (the same as torchvision.datasets.imagenet.ARCHIVE_META).
OFFICIAL_MD5 = {
    "ILSVRC2012_img_train.tar": "1d675b47d978889d74fa0da5fadfb00e",
    "ILSVRC2012_img_val.tar": "29b22e2961454d5413ddabcf34fc5622",
    "ILSVRC2012_devkit_t12.tar.gz": "fa75699e90414af021442c21a62c3abf",
}

CHUNK = 8 << 20  # 8 MiB: large enough that hashing, not syscalls, is the cost
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


class ChecksumError(ValueError):
    """A file's digest differs from the expected one, or an override is malformed."""


def md5_file(path: str | os.PathLike, progress: bool = True) -> str:
    """Hex MD5 of a file, read in chunks, with a byte progress bar."""
    from tqdm import tqdm  # here, not at the top: the CLI checks --md5 values before any hashing

    h = hashlib.md5(usedforsecurity=False)
    size = os.path.getsize(path)
    with (
        open(path, "rb", buffering=0) as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"md5 {os.path.basename(path)}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def expected_md5(name: str, overrides: dict[str, str] | None = None) -> str | None:
    """The digest `name` must have: an override if given, else the official one, else None."""
    if overrides and name in overrides:
        return overrides[name].lower()
    return OFFICIAL_MD5.get(name)


def verify_md5(path: str | os.PathLike, expected: str, progress: bool = True) -> None:
    """Raise ChecksumError (one line, naming the file and both digests) on a mismatch."""
    actual = md5_file(path, progress)
    if actual != expected.lower():
        raise ChecksumError(f"MD5 mismatch for {path}: expected {expected.lower()}, got {actual}")


def _md5_pairs(entries: Iterable[str] | Mapping[str, str] | None) -> list[tuple[str, str, str]]:
    """(name, digest, as the user wrote it) for each entry."""
    if isinstance(entries, Mapping):
        return [(str(k), str(v), f"{k}={v}") for k, v in entries.items()]
    pairs = []
    for e in entries or ():
        name, sep, digest = str(e).partition("=")
        pairs.append((name, digest if sep else "", str(e)))
    return pairs


def parse_md5(
    entries: Iterable[str] | Mapping[str, str] | None, expected: Iterable[str] | None = None
) -> dict[str, str]:
    """The one parser of `--md5` values: `NAME=HEX` strings (the CLI) or a {NAME: HEX} mapping
    (a deployment's `-p md5=...`) -> {archive file name: lowercase hex}.

    NAME may be a path: its file name is what counts (`/data/ILSVRC2012_img_val.tar=HEX`).
    With `expected`, the archive names this source has, any other name is an error listing
    them, so a misspelt name cannot be silently ignored.
    """
    out: dict[str, str] = {}
    for name, digest, shown in _md5_pairs(entries):
        name, digest = os.path.basename(name.strip().rstrip("/")), digest.strip()
        if not name or not _HEX32.match(digest):
            raise ChecksumError(f"--md5 {shown!r}: expected NAME=HEX with a 32-digit hex MD5")
        out[name] = digest.lower()
    known = None if expected is None else sorted(set(expected))
    unknown = [n for n in out if known is not None and n not in known]
    if unknown:
        names = ", ".join(known) if known else "none: this source has no archive to check"
        raise ChecksumError(f"--md5 {unknown[0]}: not an archive of this source (expected: {names})")
    return out
