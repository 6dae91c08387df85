"""Device-mapper through its ioctls on /dev/mapper/control (linux/dm-ioctl.h, interface 4).

What ``dmsetup create NAME --readonly --table ...`` does, in the three calls it makes
(DEV_CREATE, TABLE_LOAD, DEV_SUSPEND to resume), so the miniroot needs neither dmsetup nor
libdevmapper (and its libselinux and libpcre2). The new device appears as ``/dev/dm-N``
through devtmpfs; no udev is needed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

CONTROL = "/dev/mapper/control"
VERSION = (4, 0, 0)
# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags,
# event_nr, padding, dev (u64), name[128], uuid[129], data[7]
_HDR = struct.Struct("<3IIIIiIIIQ128s129s7x")
# struct dm_target_spec: sector_start, length (u64), status (s32), next (u32), target_type[16]
_SPEC = struct.Struct("<QQiI16s")
assert _HDR.size == 312 and _SPEC.size == 40

DEV_CREATE, DEV_REMOVE, DEV_SUSPEND, TABLE_LOAD, TABLE_STATUS = 3, 4, 6, 9, 12
READONLY_FLAG = 1 << 0
STATUS_BUFFER = 16384


def _request(nr: int) -> int:
    """_IOWR(0xfd, nr, struct dm_ioctl)."""
    return (3 << 30) | (_HDR.size << 16) | (0xFD << 8) | nr


@dataclass
class Header:
    name: str
    flags: int = 0
    target_count: int = 0
    dev: int = 0
    data_size: int = _HDR.size

    def pack(self) -> bytes:
        return _HDR.pack(
            *VERSION,
            self.data_size,
            _HDR.size,
            self.target_count,
            0,
            self.flags,
            0,
            0,
            self.dev,
            self.name.encode(),
            b"",
        )


def _ioctl(nr: int, buf: bytearray, what: str) -> bytearray:
    fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _request(nr), buf, True)
    except OSError as e:
        raise OSError(e.errno, f"device-mapper {what}: {os.strerror(e.errno or 0)}") from e
    finally:
        os.close(fd)
    return buf


def _devnum(dev: int) -> tuple[int, int]:
    """The kernel's huge_encode_dev: (major, minor)."""
    return (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def create(name: str, target: str, length: int, params: str, readonly: bool = True) -> str:
    """One-target device NAME of ``length`` sectors; returns its node (``/dev/dm-N``)."""
    return create_table(name, [(0, length, target, params)], readonly)


Target = tuple[int, int, str, str]  # start sector, length in sectors, target type, parameters


def create_table(name: str, targets: list[Target], readonly: bool = True) -> str:
    """Device NAME made of ``targets`` (contiguous, in order); returns its node (``/dev/dm-N``)."""
    out = _ioctl(DEV_CREATE, bytearray(Header(name).pack()), f"create {name}")
    dev = _HDR.unpack_from(out)[10]
    try:
        specs = []
        for start, length, ttype, params in targets:
            body = params.encode() + b"\0"
            body += bytes(-(_SPEC.size + len(body)) % 8)
            specs.append(_SPEC.pack(start, length, 0, _SPEC.size + len(body), ttype.encode()) + body)
        table = b"".join(specs)
        hdr = Header(name, READONLY_FLAG if readonly else 0, len(specs), data_size=_HDR.size + len(table))
        kinds = "/".join(sorted({t[2] for t in targets}))
        _ioctl(TABLE_LOAD, bytearray(hdr.pack() + table), f"load {kinds} table into {name}")
        _ioctl(DEV_SUSPEND, bytearray(Header(name).pack()), f"resume {name}")
    except OSError:
        remove(name)
        raise
    major, minor = _devnum(dev)
    node = f"/dev/dm-{minor}"
    for _ in range(100):  # devtmpfs adds the node asynchronously
        if os.path.exists(node):
            break
        time.sleep(0.02)
    total = sum(t[1] for t in targets)
    log.info("device-mapper %s: %s (%d:%d), %d %s target(s), %d sectors", name, node, major, minor,
             len(targets), kinds, total)  # fmt: skip
    return node


def remove(name: str) -> None:
    try:
        _ioctl(DEV_REMOVE, bytearray(Header(name).pack()), f"remove {name}")
    except OSError as e:
        if e.errno != errno.ENXIO:
            log.warning("%s", e)


def status(name: str) -> str:
    """The target's status line (for verity: ``V`` verified so far, ``C`` corruption seen)."""
    buf = bytearray(Header(name, data_size=STATUS_BUFFER).pack().ljust(STATUS_BUFFER, b"\0"))
    _ioctl(TABLE_STATUS, buf, f"status of {name}")
    fields = _HDR.unpack_from(buf)
    count, data_start = fields[5], fields[4]
    if count < 1:
        return ""
    ttype = _SPEC.unpack_from(buf, data_start)[4].rstrip(b"\0").decode()
    text = buf[data_start + _SPEC.size :].split(b"\0", 1)[0].decode()
    return f"{ttype} {text}".strip()
