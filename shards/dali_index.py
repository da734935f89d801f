"""The DALI webdataset index, format v1.2: its one home (version, write, parse, key of a row).

As nvidia.dali's wds2idx writes it: a header line `v1.2 N`, then one line per sample listing
its tar members in tar order, four fields each: `ext data_offset size member_name`, where ext
is the member name after the key's first dot and data_offset is where the member's bytes start
(after its 512-byte header). Written beside every tar by shards/writer.py, checked against the
tar by shards/verify.py, parsed into offset arrays by loaders/spec.py, and written again for
per-epoch sub-indexes by loaders/dali.py (the same lines, a subset in another order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

VERSION = "v1.2"

Member = tuple[str, int, int, str]  # (ext, data offset, size, member name)


class IndexFormatError(ValueError):
    """Not a v1.2 index, or a malformed one; the message says what is wrong."""


def member_fields(members: Iterable[Member]) -> str:
    """One sample's index line."""
    return " ".join(f"{e} {o} {s} {n}" for e, o, s, n in members)


def index_text(lines: Sequence[str]) -> str:
    """A whole index from its sample lines (the header counts them)."""
    return f"{VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def header_count(first_line: str) -> int:
    """N from the header line `v1.2 N`."""
    parts = first_line.split("\n", 1)[0].split()
    if len(parts) != 2 or parts[0] != VERSION or not parts[1].isdigit():
        raise IndexFormatError(f"not a DALI {VERSION} index (first line {first_line[:40]!r})")
    return int(parts[1])


def row_key(line: str) -> str:
    """The sample key of an index line: its first member's name before the first dot."""
    fields = line.split()
    return fields[3].split(".", 1)[0] if len(fields) > 3 else "?"


def _lines(text: str) -> list[str]:
    lines = text.splitlines()
    n = header_count(lines[0] if lines else "")
    if len(lines) - 1 != n:
        raise IndexFormatError(f"header says {n} samples but {len(lines) - 1} lines follow")
    return lines[1:]


def parse_members(text: str) -> list[list[Member]]:
    """Every sample's members, as written."""
    samples = []
    for line in _lines(text):
        f = line.split()
        if len(f) % 4:
            raise IndexFormatError(f"malformed index line: {line!r}")
        samples.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
    return samples


@dataclass
class OffsetArrays:
    """Per sample, where its image and its fixed-width label member are (about 25 bytes a sample)."""

    image_ext: np.ndarray  # uint8: position in the image_exts given to parse_offsets
    image_offset: np.ndarray  # int64
    image_size: np.ndarray  # int64
    label_offset: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.image_offset)


def parse_offsets(text: str, image_exts: Sequence[str], label_ext: str) -> OffsetArrays:
    """The image member (the first of `image_exts` found) and the `label_ext` member of every sample."""
    lines = _lines(text)
    n = len(lines)
    ext = np.zeros(n, np.uint8)
    img_off, img_size, lab_off = (np.zeros(n, np.int64) for _ in range(3))
    for i, line in enumerate(lines):
        t = line.split()
        found_img = found_lab = False
        for j in range(0, len(t) - 3, 4):
            e = t[j]
            if e in image_exts and not found_img:
                ext[i], img_off[i], img_size[i] = image_exts.index(e), int(t[j + 1]), int(t[j + 2])
                found_img = True
            elif e == label_ext:
                lab_off[i] = int(t[j + 1])
                found_lab = True
        if not (found_img and found_lab):
            raise IndexFormatError(
                f"sample {row_key(line)} lacks a {'/'.join('.' + e for e in image_exts)} image or a .{label_ext} label member"
            )
    return OffsetArrays(ext, img_off, img_size, lab_off)


def subset_text(
    rows: OffsetArrays, samples: Iterable[int], image_exts: Sequence[str], label_ext: str, label_size: int
) -> str:
    """An index listing only `samples` (repeats allowed), in that order, with the image and the label
    member of each: what DALI's reader needs to read exactly those rows of the tar."""
    lines = []
    for i in samples:
        e = image_exts[rows.image_ext[i]]
        lines.append(
            member_fields(
                [
                    (e, int(rows.image_offset[i]), int(rows.image_size[i]), f"s{i}.{e}"),
                    (label_ext, int(rows.label_offset[i]), label_size, f"s{i}.{label_ext}"),
                ]
            )
        )
    return index_text(lines)
