"""Member offsets of a tar, and of tars inside a tar, read from headers only.

The ImageNet train archive is a tar of 1000 class tars. `TarInfo.offset_data` of an outer
member plus that of an inner member is where an image's bytes start in the outer file, so
every image can be read with one positioned read and nothing is ever extracted. Indexing
reads the 512-byte headers and seeks over the data (tarfile in "r:" mode on a seekable file
does exactly that), so it costs one small read per member, not a pass over 150 GB.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    offset: int  # absolute offset of the member's data in the outermost file
    size: int
    kind: str  # file, dir, symlink, hardlink, device, fifo, other
    linkname: str = ""


class Window:
    """A read-only, seekable view of bytes [start, start + length) of an open file descriptor.

    Reads use os.pread, so several windows (and other readers) can share one descriptor
    without fighting over a file position.
    """

    def __init__(self, fd: int, start: int, length: int, name: str = "") -> None:
        self.fd, self.start, self.length, self.name, self.pos = fd, start, length, name, 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.length - self.pos
        n = max(0, min(n, self.length - self.pos))
        data = os.pread(self.fd, n, self.start + self.pos) if n else b""
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:  # the descriptor belongs to the caller
        pass


def _kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.isdev():
        return "device" if (info.ischr() or info.isblk()) else "fifo"
    return "other"


def iter_members(fd: int, start: int = 0, length: int | None = None, name: str = "") -> Iterator[Member]:
    """Every member of the tar stored at [start, start + length) of `fd`, headers only.

    Raises tarfile.TarError (ReadError, HeaderError) on a damaged or truncated archive.
    """
    if length is None:
        length = os.fstat(fd).st_size - start
    window = Window(fd, start, length, name)
    with tarfile.open(fileobj=window, mode="r:") as tf:  # type: ignore[call-overload]
        while (info := tf.next()) is not None:
            yield Member(info.name, start + info.offset_data, info.size, _kind(info), info.linkname)
            tf.members.clear()  # keep memory flat: inner tars hold ~1300 members, the outer 1000


def unsafe_reason(m: Member) -> str | None:
    """Why a member must never be followed or written, or None if it is a plain relative file."""
    if m.kind == "symlink":
        return f"symlink to {m.linkname!r}, not followed"
    if m.kind == "hardlink":
        return f"hard link to {m.linkname!r}, not followed"
    if m.kind != "file":
        return f"{m.kind} member, not a regular file"
    if m.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", m.name):
        return "absolute path in archive"
    if ".." in PurePosixPath(m.name.replace("\\", "/")).parts:
        return "path escapes the archive ('..')"
    return None


def member_key(name: str) -> str:
    """Sample key from a member name: the file's stem, every character but [A-Za-z0-9_-] -> '_'.

    For ImageNet names this is "dots replaced by '_'" (n01440764_10026.JPEG -> n01440764_10026);
    the wider rule also keeps slashes, dots and spaces (which would break tar keys and DALI's
    space-separated index) out of anything the writer names.
    """
    base = PurePosixPath(name.replace("\\", "/")).name
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    return _KEY_UNSAFE.sub("_", stem) or "_"
