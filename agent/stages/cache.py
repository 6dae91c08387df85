"""Stage 4: the cache partition (``seed.cache=``, default the ext4 labelled KNXBLOCK) at /knxblock.

Found by reading each block device's ext2/3/4 superblock (label and UUID at fixed offsets)
rather than exec'ing blkid for every device. Checked with ``e2fsck -p`` when the miniroot
has it. No partition (or one that will not mount): the cache goes to RAM (tmpfs) and the
console says so — the boot works, but the next one downloads again.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass

from seedboot.agent.stages import Context
from seedboot.agent.stages import syscalls as sc

log = logging.getLogger(__name__)

CACHE_WAIT = 5.0
EXT_MAGIC = 0xEF53
SB_OFFSET = 1024
RAM_SIZE = "25%"
_SKIP = ("loop", "ram", "zram", "nbd", "sr", "fd", "dm-")


@dataclass(frozen=True)
class ExtFs:
    device: str
    label: str
    uuid: str


def read_ext(path: str) -> ExtFs | None:
    """The label and UUID of an ext2/3/4 file system on ``path``, or None if it is not one."""
    try:
        with open(path, "rb") as f:
            f.seek(SB_OFFSET)
            sb = f.read(256)
    except OSError:
        return None
    if len(sb) < 136 or struct.unpack_from("<H", sb, 0x38)[0] != EXT_MAGIC:
        return None
    label = sb[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace")
    u = sb[0x68:0x78].hex()  # as uuid.UUID prints it, without importing uuid (platform, ...)
    return ExtFs(path, label, f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}")


def block_devices(sys_class: str = "/sys/class/block") -> list[str]:
    try:
        names = sorted(os.listdir(sys_class))
    except OSError:
        return []
    return [n for n in names if not n.startswith(_SKIP)]


def matches(fs: ExtFs, spec: str) -> bool:
    kind, _, want = spec.partition("=")
    if kind == "LABEL":
        return fs.label == want
    if kind == "UUID":
        return fs.uuid.lower() == want.lower()
    return os.path.realpath(fs.device) == os.path.realpath(spec)


def find(spec: str, dev_dir: str = "/dev", sys_class: str = "/sys/class/block") -> ExtFs | None:
    if spec.startswith("/dev/"):
        return read_ext(spec)
    for name in block_devices(sys_class):
        fs = read_ext(os.path.join(dev_dir, name))
        if fs is not None and matches(fs, spec):
            return fs
    return None


def fsck(dev: str) -> str:
    e2fsck = shutil.which("e2fsck") or shutil.which("fsck.ext4")
    if e2fsck is None:
        return "not checked (no e2fsck in the miniroot)"
    p = sc.run([e2fsck, "-p", dev], timeout=120, what=f"checking {dev}", check=False)
    if p.returncode in (0, 1):
        return "checked" if p.returncode == 0 else "checked, errors fixed"
    if p.returncode == 2:
        return "checked, errors fixed (reboot advised)"
    raise OSError(0, f"e2fsck -p {dev} exit {p.returncode}: {p.stdout.strip()[-200:]}")


def ram(ctx: Context, why: str) -> str:
    target = str(ctx.paths.cache)
    os.makedirs(target, exist_ok=True)
    sc.mount("tmpfs", target, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, f"mode=0755,size={RAM_SIZE}")
    ctx.cache_kind = "ram"
    ctx.cache_dev = None
    msg = f"{why}: caching in RAM (tmpfs, {RAM_SIZE} of memory); the next boot downloads again"
    log.warning("%s", msg)
    return msg


def run(ctx: Context) -> str:
    from seedboot.agent.stages.hardware import settle, wait_quick

    # the disk drivers and file systems load in the background since the hardware stage: the
    # IDE/SATA ones, slow to probe their ports, only matter if the partition is not elsewhere
    wait_quick(ctx)
    spec = ctx.cmdline.cache
    fs = find(spec)
    if fs is None:
        settle(ctx)
        fs = find(spec)
    deadline = time.monotonic() + CACHE_WAIT
    if fs is None:
        ctx.console.waiting(f"the cache partition {spec}", CACHE_WAIT)
    while fs is None and time.monotonic() < deadline:
        time.sleep(0.1)
        fs = find(spec)
    if fs is None:
        return ram(ctx, f"no ext4 file system {spec} found")
    target = str(ctx.paths.cache)
    os.makedirs(target, exist_ok=True)
    try:
        checked = fsck(fs.device)
        sc.mount(fs.device, target, "ext4", sc.MS_NOSUID | sc.MS_NODEV, None)
    except OSError as e:
        return ram(ctx, f"cache partition {fs.device} unusable ({e.strerror or e})")
    ctx.cache_kind = "disk"
    ctx.cache_dev = fs.device
    st = os.statvfs(target)
    free = st.f_bavail * st.f_frsize / 2**20
    size = st.f_blocks * st.f_frsize / 2**20
    return f"{fs.device} (LABEL={fs.label}) on {target}, {checked}, {free:.0f} of {size:.0f} MiB free"
