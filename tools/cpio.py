"""A minimal ``newc`` cpio writer, enough for Linux initramfs images.

Written here rather than with cpio(1) so device nodes (/dev/console) need no root, and the
archive is reproducible: entries sorted, owner root, mtime 0.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class Entry:
    name: str  # path inside the archive, no leading slash
    mode: int  # full st_mode (type | permissions)
    data: bytes = b""  # file contents, or the symlink target
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def chardev(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def tree(root: Path, prefix: str) -> Iterable[Entry]:
    """Every directory, file and symlink under ROOT, named PREFIX/relative path."""
    yield directory(prefix)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        for n in [*dirnames, *sorted(filenames)]:
            p = d / n
            name = f"{prefix}/{p.relative_to(root)}"
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                yield symlink(name, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                yield directory(name, stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                yield file(name, p.read_bytes(), stat.S_IMODE(st.st_mode))


def _header(ino: int, e: Entry, namesize: int) -> bytes:
    fields = (
        ino,
        e.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(e.mode) else 1,  # nlink
        0,  # mtime: reproducible archives
        len(e.data),
        0,  # devmajor
        0,  # devminor
        e.rdev[0],
        e.rdev[1],
        namesize,
        0,  # check
    )
    return b"070701" + b"".join(b"%08X" % v for v in fields)


def write(out: BinaryIO, entries: Iterable[Entry]) -> int:
    """Write ENTRIES (sorted, parents first; a later duplicate wins) and the trailer; returns bytes."""
    unique: dict[str, Entry] = {}
    for e in entries:
        unique[e.name.strip("/")] = e
    # The kernel's unpacker creates no missing parents (cpio -id does, so this hides in tests).
    for name in list(unique):
        parts = name.split("/")
        for i in range(1, len(parts)):
            unique.setdefault("/".join(parts[:i]), directory("/".join(parts[:i])))
    written = 0

    def emit(chunk: bytes) -> None:
        nonlocal written
        out.write(chunk)
        written += len(chunk)
        out.write(b"\0" * (-written % 4))
        written += -written % 4

    for ino, name in enumerate(sorted(unique, key=lambda n: n.split("/")), start=1):
        e = unique[name]
        raw = name.encode() + b"\0"
        emit(_header(ino, e, len(raw)) + raw)
        if e.data:
            emit(e.data)
    trailer = b"TRAILER!!!\0"
    emit(_header(0, Entry("TRAILER!!!", 0), len(trailer)) + trailer)
    return written


def read_names(data: bytes) -> dict[str, Entry]:
    """Parse an uncompressed newc archive (for tests and inspection): name -> Entry."""
    out: dict[str, Entry] = {}
    pos = 0
    while pos + 110 <= len(data):
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            break
        out[name] = Entry(name, mode, data[pos : pos + size], (rmaj, rmin))
        pos += size
        pos += -pos % 4
    return out
