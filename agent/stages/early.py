"""Stage 1: the kernel's file systems, the console, and the kernel command line."""

from __future__ import annotations

import contextlib
import logging
import os

from seedboot.agent import cmdline as cmdlinemod
from seedboot.agent.stages import Context
from seedboot.agent.stages import syscalls as sc

# (target, fstype, flags, data); /run is usually mounted already by /init (it holds the runtime).
MOUNTS: tuple[tuple[str, str, int, str], ...] = (
    ("/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, ""),
    ("/sys", "sysfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, ""),
    ("/dev", "devtmpfs", sc.MS_NOSUID, "mode=0755"),
    ("/run", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755,size=50%"),
)
CMDLINE = "/proc/cmdline"
log = logging.getLogger(__name__)


def mount_kernel_fs() -> list[str]:
    done = []
    for target, fstype, flags, data in MOUNTS:
        if sc.is_mountpoint(target):
            continue
        os.makedirs(target, exist_ok=True)
        sc.mount(fstype, target, fstype, flags, data or None)
        done.append(target)
    for sub, fstype in (("/dev/pts", "devpts"), ("/dev/shm", "tmpfs")):
        if not sc.is_mountpoint(sub):
            os.makedirs(sub, exist_ok=True)
            # Without them a rescue shell merely lacks job control: not worth failing for.
            with contextlib.suppress(OSError):
                sc.mount(fstype, sub, fstype, sc.MS_NOSUID | sc.MS_NOEXEC)
    return done


def fix_console() -> None:
    """If the kernel found no /dev/console in the initramfs, fds 0-2 are closed: open them now."""
    try:
        os.fstat(1)
        return
    except OSError:
        pass
    fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
    for n in (0, 1, 2):
        if n != fd:
            os.dup2(fd, n)


def run(ctx: Context) -> str:
    mounted = mount_kernel_fs()
    fix_console()
    ctx.console.use_all_consoles()
    os.makedirs(ctx.paths.run, exist_ok=True)
    with open(CMDLINE, encoding="utf-8", errors="replace") as f:
        text = f.read()
    ctx.cmdline = cmdlinemod.parse(text)
    from seedboot.agent.console import setup_logging

    setup_logging(ctx.console, ctx.cmdline.debug, str(ctx.paths.agent_log))
    # The block daemon's interpreter start and imports take seconds under emulation: begin
    # them now, in their own process, so they overlap the waits of the stages in between.
    from seedboot.agent.stages import blockdev

    if ctx.prewarmed is None:
        try:
            ctx.prewarmed = blockdev.prewarm(ctx)
        except OSError as e:
            log.warning("cannot start the block daemon early (%s); it starts in its stage", e)
    c = ctx.cmdline
    what = f"image {c.name or '?'} v{c.version or 'latest'}"
    what += ", offline" if c.offline else f", {len(c.mirrors)} mirror(s)"
    if c.break_before:
        what += f", break before {c.break_before}"
    return f"mounted {' '.join(mounted) or 'nothing (all there)'}; {what}"
