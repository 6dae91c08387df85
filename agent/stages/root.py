"""Stage 8: read-only loop device on the FUSE file, its file system, and an overlay on top.

The loop device is set up with one ``LOOP_CONFIGURE`` ioctl (read-only, direct I/O: the
page cache of the loop device is enough, a second copy in the FUSE file's cache only costs
memory; PLATFORM-NOTES measured it faster too). The overlay's upper layer is a tmpfs under
/run (``seed.overlay=tmpfs``, the default) or ``/knxblock/overlay/NAME`` on the cache
partition (``seed.overlay=persist``), so changes survive a reboot.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from seedboot.agent.errors import SeedError
from seedboot.agent.stages import Context
from seedboot.agent.stages import syscalls as sc

log = logging.getLogger(__name__)

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
# loop_info64: 5 x u64, 4 x u32 (number, encrypt_type, encrypt_key_size, flags), 64+64+32 bytes, 2 x u64
_LOOP_INFO64 = "<5Q4I64s64s32s2Q"
_LOOP_CONFIG = "<II" + _LOOP_INFO64[1:] + "8Q"
DEFAULT_INIT = "/sbin/init"
OVERLAY_TMPFS_SIZE = "50%"
# The root stage stops waiting for the boot profile's prefetch and the carried blocks after
# this long without progress
PROFILE_STALL = 10.0
PROFILE_REPORT = 5.0  # a console line this often while it waits


def loop_config(fd: int, name: str, flags: int) -> bytes:
    return struct.pack(
        _LOOP_CONFIG, fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, flags, name.encode()[:63], b"", b"", 0, 0, *([0] * 8)
    )


def attach_loop(image: Path, direct_io: bool = True) -> tuple[str, int]:
    """A free loop device on ``image``, read-only: its path (e.g. /dev/loop0) and an open fd.

    The loop device is set to clear itself when its last user goes; so the caller keeps the
    fd open until the mount holds the device, then closes it."""
    ctl = os.open("/dev/loop-control", os.O_RDWR)
    try:
        n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    finally:
        os.close(ctl)
    dev = f"/dev/loop{n}"
    for _ in range(50):  # devtmpfs creates the node asynchronously after GET_FREE
        if os.path.exists(dev):
            break
        time.sleep(0.02)
    backing = os.open(image, os.O_RDONLY)
    loopfd = os.open(dev, os.O_RDONLY)
    try:
        flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | (LO_FLAGS_DIRECT_IO if direct_io else 0)
        try:
            fcntl.ioctl(loopfd, LOOP_CONFIGURE, loop_config(backing, image.name, flags))
        except OSError as e:
            if not direct_io or e.errno != errno.EINVAL:
                raise
            log.info("loop: direct I/O refused on %s; without it", image)
            fcntl.ioctl(loopfd, LOOP_CONFIGURE, loop_config(backing, image.name, flags & ~LO_FLAGS_DIRECT_IO))
    except OSError:
        os.close(loopfd)
        raise
    finally:
        os.close(backing)  # the loop device holds its own reference to the file
    return dev, loopfd


def fstype(dev: str) -> str:
    with open(dev, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"hsqs":
        return "squashfs"
    if len(head) >= 1028 and struct.unpack_from("<I", head, 1024)[0] == 0xE0F5E1E2:
        return "erofs"
    if len(head) >= 1082 and struct.unpack_from("<H", head, 1080)[0] == 0xEF53:
        return "ext4"
    raise SeedError(
        f"root filesystem did not mount: {dev} holds no ext4, erofs or squashfs file system",
        "the published image is not a file system image; republish it",
    )


def upper_dirs(ctx: Context) -> tuple[Path, Path, str]:
    if ctx.cmdline.overlay == "persist":
        if ctx.cache_kind != "disk":
            raise SeedError(
                "seed.overlay=persist needs the cache partition, but the cache is in RAM",
                "attach the seed disk's KNXBLOCK partition, or boot with seed.overlay=tmpfs",
            )
        base = ctx.paths.cache / "overlay" / (ctx.cmdline.name or "root")
        where = f"persistent on {base}"
    else:
        base = ctx.paths.run / "overlay"
        base.mkdir(parents=True, exist_ok=True)
        if not sc.is_mountpoint(str(base)):
            sc.mount("tmpfs", str(base), "tmpfs", sc.MS_NOSUID, f"mode=0755,size={OVERLAY_TMPFS_SIZE}")
        where = f"tmpfs ({OVERLAY_TMPFS_SIZE} of RAM)"
    upper, work = base / "upper", base / "work"
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return upper, work, where


def init_path(ctx: Context) -> str:
    return ctx.cmdline.init or DEFAULT_INIT


def has_init(newroot: Path, init: str) -> bool:
    """True if ``init`` exists in ``newroot`` (following symlinks inside the new root)."""
    p = init
    for _ in range(10):
        full = newroot / p.lstrip("/")
        if full.is_symlink():
            target = os.readlink(full)
            p = target if target.startswith("/") else os.path.join(os.path.dirname(p), target)
            continue
        return full.is_file()
    return False


def wait_for_copy(status_path: Path, say: Callable[[str], None] = log.info) -> str:
    """While the block daemon prefetches the boot profile into the local copy, and while the
    copy carries over the last version's unchanged blocks, wait for them (the boot then reads
    those blocks without the daemon: each read through it costs ~2 ms of CPU under emulation,
    and the whole profile's transfer is the same either way), as long as it makes progress,
    saying how far it got every PROFILE_REPORT seconds. Returns a note for the root line.

    Between reads of ``status_path`` (``progress.json``, through FUSE) it watches the daemon's
    flag file beside the mount (``localcopy.settled_flag``): a check every SETTLED_POLL s costs
    nothing, and the progress is read again once the flag says settled, or every
    PROFILE_REPORT s for the report and the stall check. Without the flag it reads the
    progress every 0.2 s."""
    from seedboot.agent.localcopy import (
        SETTLED_POLL,
        carry_left,
        copying_profile,
        progress_mark,
        settled,
        settled_flag,
    )

    flag = settled_flag(status_path.parent)
    t0 = last = reported = time.monotonic()
    seen: tuple[object, ...] = ()
    carry_total = 0
    while True:
        try:
            st = json.loads(status_path.read_bytes())
        except (OSError, ValueError) as e:
            log.warning("local copy: cannot read %s: %s; not waiting for it", status_path, e)
            return ""
        pf, cp = st.get("prefetch") or {}, st.get("copy") or {}
        if not cp or cp.get("stopped"):
            return ""
        profile = copying_profile(st)
        carry_total = max(carry_total, carry_left(cp) + int(cp.get("carried") or 0))
        if not profile and not carry_total:
            return ""
        now = time.monotonic()
        if settled(st):
            done = [f"the profile's {pf['total']} blocks copied first"] if profile else []
            if carry_total:
                done.append(f"{cp.get('carried')} blocks carried over from the last version's copy")
            return f" ({' and '.join(done)}: waited {now - t0:.1f}s)"
        if now - reported >= PROFILE_REPORT:
            reported = now
            what = [f"the boot profile: {pf.get('done')} of {pf['total']} blocks"] if profile else []
            if carry_total:
                what.append(f"the last version's: {cp.get('carried')} of {carry_total} blocks")
            say(f"root: copying {', '.join(what)}, {now - t0:.0f}s")
        if progress_mark(st) != seen:
            seen, last = progress_mark(st), now
        elif now - last > PROFILE_STALL:
            log.warning("local copy: no progress for %.0f s", PROFILE_STALL)
            return f" (stopped waiting for the local copy after {now - t0:.1f}s: no progress)"
        _wait_settled(flag, reported + PROFILE_REPORT, SETTLED_POLL)


def _wait_settled(flag: Path, until: float, step: float) -> None:
    """Until FLAG says "1" or UNTIL, checking it every STEP s. No flag (a daemon that does not
    write it), or one already set while the progress still says otherwise: 0.2 s, as before."""
    if _flag(flag) != b"0":
        time.sleep(0.2)
        return
    while time.monotonic() < until:
        time.sleep(step)
        if _flag(flag) != b"0":
            return


def _flag(flag: Path) -> bytes:
    try:
        return flag.read_bytes()
    except OSError:
        return b""


def with_local_copy(ctx: Context, fuse_dev: str) -> tuple[str, str]:
    """The device dm-verity goes over: ``fuse_dev`` itself, or, when the cache partition holds
    a local copy of blocks read before (agent/localcopy.py), a device-mapper device whose
    copied blocks and holes map to that copy and the rest to ``fuse_dev``. Any problem with
    the copy means booting without it, with a note."""
    from seedboot.agent import dm, localcopy, verity
    from seedboot.agent.stages.blockdev import wants_copy

    rel = ctx.release
    if rel is None or rel.meta.verity is None or not wants_copy(ctx):
        return fuse_dev, ""
    if verity.unavailable(rel.meta.verity, fuse_dev):
        return fuse_dev, ""  # never bytes that bypass the daemon without dm-verity over them
    index = rel.index
    profile = wait_for_copy(ctx.paths.mountpoint / "progress.json", ctx.console.note)
    img, map_path = localcopy.paths(ctx.paths.cache, rel.meta.name, rel.meta.index)
    copied = localcopy.usable(img, map_path, index)
    if not copied:
        return fuse_dev, f"; no local copy yet (the blocks read now are kept for the next boot){profile}"
    try:
        copy_dev, copy_fd = attach_loop(img)
    except OSError as e:
        log.warning("local copy %s: no loop device: %s; reading through the block daemon", img, e)
        return fuse_dev, f"; local copy not used: {e.strerror}"
    try:
        dev = dm.create_table(localcopy.MIX_NAME, localcopy.table(index, copied, fuse_dev, copy_dev))
    except OSError as e:
        log.warning("local copy: %s; reading through the block daemon", e)
        return fuse_dev, f"; local copy not used: {e.strerror}"
    finally:
        os.close(copy_fd)  # the device-mapper table holds the loop device now
    mib = len(copied) * index.block_size / 2**20
    return (
        dev,
        f"; {len(copied)} of {index.nblocks} blocks ({mib:.0f} MiB) from the local copy {img}{profile}",
    )


def run(ctx: Context) -> str:
    from seedboot.agent.stages.hardware import settle

    # loop, overlay, dm-verity (loading in the background since hardware); the IDE/SATA disk
    # drivers only if the cache stage needed them to look for its partition
    settle(ctx, slow_storage=False)
    image = ctx.paths.mountpoint / "disk.img"
    try:
        dev, loopfd = attach_loop(image)
    except OSError as e:
        raise SeedError(
            f"root filesystem did not mount: no loop device on {image}: {e.strerror}",
            "is the loop module in the miniroot? see /run/seedboot/blockdev.log",
        ) from e
    ctx.loopdev = dev
    verity_note = copy_note = ""
    try:
        if ctx.release is not None:
            # Chain of trust (agent/verity.py): dm-verity between the loop device and the mount.
            from seedboot.agent import verity

            meta = ctx.release.meta
            fetch = ctx.verity_fetch
            if fetch is None and meta.verity is not None:  # the blockdev stage did not start it
                from seedboot.agent.stages.blockdev import start_tree_fetch

                fetch = start_tree_fetch(ctx, meta.name, meta.verity)
            dev, copy_note = with_local_copy(ctx, dev)
            dev, verity_note = verity.protect(meta.verity, dev, attach_loop, fetch)
            verity_note += copy_note
        fs = fstype(dev)
        lower = ctx.paths.lower
        lower.mkdir(parents=True, exist_ok=True)
        try:
            sc.mount(dev, str(lower), fs, sc.MS_RDONLY)
        except OSError as e:
            raise SeedError(
                f"root filesystem did not mount: {fs} on {dev}: {e.strerror}",
                f"is the {fs} module in the miniroot? see /run/seedboot/blockdev.log for read errors",
            ) from e
    finally:
        os.close(loopfd)
    upper, work, where = upper_dirs(ctx)
    newroot = ctx.paths.newroot
    newroot.mkdir(parents=True, exist_ok=True)
    try:
        sc.mount("overlay", str(newroot), "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")
    except OSError as e:
        raise SeedError(
            f"root filesystem did not mount: overlay on {newroot}: {e.strerror}",
            "with seed.overlay=persist, remove a damaged /knxblock/overlay from the rescue shell",
        ) from e
    init = init_path(ctx)
    if not has_init(newroot, init):
        raise SeedError(
            f"the root file system has no {init}",
            "is this an OS image? boot with init=PATH to run another program",
        )
    verity_note = f"; {verity_note}" if verity_note else ""
    return f"{dev} ({fs}, ro, direct I/O) on {lower}; overlay {where} on {newroot}{verity_note}"
