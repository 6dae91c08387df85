"""mount(2), umount2(2), chroot, reboot and one ``run()`` for the few programs the stages exec.

ctypes on libc rather than busybox ``mount``: no fork/exec per mount (each costs under
emulation) and the errno comes back as a readable ``OSError``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import subprocess
from collections.abc import Sequence
from functools import cache

from seedboot.agent.errors import SeedError

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC


@cache
def _libc() -> ctypes.CDLL:
    # The loaded libc by its soname: ctypes.util (shutil, tempfile, ...) costs PID 1 ~0.1 s under TCG.
    return ctypes.CDLL("libc.so.6", use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    ret = _libc().mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(ret, f"mount {source} on {target}" + (f" ({fstype})" if fstype else ""))
    log.debug("mounted %s on %s type %s flags %#x %s", source, target, fstype, flags, data or "")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc().umount2(target.encode(), flags), f"umount {target}")


def is_mountpoint(path: str) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def reboot(cmd: int = RB_AUTOBOOT) -> None:
    os.sync()
    _check(_libc().reboot(ctypes.c_int(cmd)), "reboot")


def run(
    argv: Sequence[str], timeout: float, what: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a program with a time limit; a failure names the command and its output."""
    log.debug("run %s", shlex.join(argv))
    try:
        p = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as e:
        raise SeedError(f"{what}: {argv[0]} not found", "the initramfs lacks this tool; rebuild it") from e
    except subprocess.TimeoutExpired as e:
        raise SeedError(f"{what}: {shlex.join(argv)} did not finish within {timeout:.0f}s") from e
    if check and p.returncode != 0:
        out = (p.stderr or p.stdout).strip().splitlines()
        raise SeedError(f"{what}: {shlex.join(argv)} failed ({p.returncode}): {' '.join(out[-3:])}")
    return p
