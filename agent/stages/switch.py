"""Stage 9: switch into the new root and exec its init, like busybox ``switch_root``.

1. Delete the initramfs's files (not crossing into other file systems): its memory is
   freed. Only on rootfs/tmpfs and only as PID 1 — never on a disk.
2. Make /dev /proc /sys /run appear in the new root. They are bound recursively rather than
   moved: the block daemon keeps the initramfs as its root directory, and a move would take
   /run (its runtime, its lazily imported modules) and /proc from under it. For the booted
   OS the result is the same as a move. The cache partition is also bound at
   /run/seedboot/knxblock so the booted OS can see it.
3. Move the new root over ``/``, chroot into it, exec its init (``init=`` or /sbin/init).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time

from seedboot.agent.console import uptime
from seedboot.agent.errors import SeedError
from seedboot.agent.procfs import cpu_seconds, machine_cpu
from seedboot.agent.stages import Context
from seedboot.agent.stages import syscalls as sc
from seedboot.agent.stages.root import has_init, init_path

log = logging.getLogger(__name__)

KERNEL_MOUNTS = ("dev", "proc", "sys", "run")
RAMFS_MAGIC = 0x858458F6
TMPFS_MAGIC = 0x01021994


def delete_contents(path: str, dev: int) -> int:
    """Remove everything under ``path`` on device ``dev``; mount points are left alone."""
    removed = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_dev != dev:
            continue  # another file system mounted here
        full = e.path
        try:
            if stat.S_ISDIR(st.st_mode):
                removed += delete_contents(full, dev)
                os.rmdir(full)
            else:
                os.unlink(full)
            removed += 1
        except OSError:
            pass  # a mount point below, or busy: switch_root ignores these too
    return removed


def root_is_ram() -> bool:
    import ctypes

    class Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    buf = Statfs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(b"/", ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) in (RAMFS_MAGIC, TMPFS_MAGIC)


def timing_line(ctx: Context) -> str:
    now = uptime()
    handoff = ctx.timings.get("handoff", 0.0)
    first = ctx.timings.get("first-line", 0.0)
    waits = sum(v for k, v in ctx.timings.items() if k.startswith("wait:"))
    total = now - handoff
    return (
        f"timing: kernel ran /init at {handoff:.2f}s, agent's first line at {first:.2f}s, "
        f"switch at {now:.2f}s: agent {total:.2f}s, of which waiting for link, DHCP and mirror "
        f"probes {waits:.2f}s, block daemon start {ctx.timings.get('daemon-start', 0.0):.2f}s; "
        f"overhead (all but the waits) {total - waits:.2f}s{cpu_split(ctx)}"
    )


def daemon_threads(ctx: Context) -> str:
    """The block daemon's CPU by thread, from its status (one read through its mount):
    " (verify 0.88, main 0.72, fetcher 0.58, local-copy 0.14)". The share that moves bytes
    (fetcher: curl and the network; verify: SHA-256 and zstd; local-copy: the writes) and its
    start (in main) are what a change to the daemon moves; "" if the status cannot be read."""
    if not ctx.daemon_pid:
        return ""
    try:
        threads = json.loads((ctx.paths.mountpoint / "status.json").read_bytes())["cpu"]["threads"]
        busy = sorted(((str(k), float(v)) for k, v in threads.items()), key=lambda kv: -kv[1])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.info("block daemon status: %s; no split by thread", e)
        return ""
    parts = [f"{name} {secs:.2f}" for name, secs in busy if secs >= 0.01]
    return f" ({', '.join(parts)})" if parts else ""


def cpu_split(ctx: Context) -> str:
    """Who used the CPU from the agent's first line to now: under emulation the machine is
    CPU-bound, so this says what the overhead above is made of."""
    if "cpu:busy" not in ctx.timings:
        return ""
    threads = daemon_threads(ctx)
    try:
        busy, idle = machine_cpu()
        daemon = cpu_seconds(f"/proc/{ctx.daemon_pid}/stat") if ctx.daemon_pid else 0.0
    except OSError:
        return ""
    t = os.times()
    agent = time.process_time() - ctx.timings["cpu:agent"]
    commands = t.children_user + t.children_system
    rest = busy - ctx.timings["cpu:busy"] - agent - commands - daemon
    return (
        f"; CPU since the first line: agent {agent:.2f}s, its commands {commands:.2f}s, "
        f"block daemon {daemon:.2f}s{threads}, kernel and the rest {max(rest, 0.0):.2f}s, "
        f"idle {idle - ctx.timings['cpu:idle']:.2f}s"
    )


def clean_shutdown(ctx: Context) -> str:
    """With the cache on a partition: what has the block daemon write what it holds and leave
    the partition clean at shutdown (agent/quiesce.py), in the /run the new root gets. With
    systemd in the new root, a unit does it; any other init can run /run/seedboot/quiesce
    before it powers off (the demo root does), else the partition's journal replays at the
    next mount and the blocks the daemon still held are fetched again."""
    from seedboot.agent.quiesce import SCRIPT, install_script, install_unit

    newroot = ctx.paths.newroot
    if ctx.cache_kind != "disk" or not ctx.daemon_pid:
        return ""
    progress, script = ctx.paths.mountpoint / "progress.json", ctx.paths.run / SCRIPT
    try:
        install_script(script, ctx.daemon_pid, progress)
    except OSError as e:
        log.warning("cannot write %s: %s", script, e)
    if not any((newroot / p).exists() for p in ("usr/lib/systemd/systemd", "lib/systemd/systemd")):
        log.info("no systemd in the new root: its shutdown may run %s", script)
        return f"; at shutdown, run {script} to leave the cache clean"
    try:
        return "; " + install_unit(ctx.paths.run.parent, ctx.daemon_pid, progress)
    except OSError as e:
        log.warning("cannot install the shutdown unit: %s", e)
        return ""


# The booted OS's udev probes every block device it is told of (blkid, its by-id and by-uuid
# links). The agent's own devices hold nothing for it to find and each probe reads through
# the block daemon and dm-verity: in the benchmark's offline boot, 49 reads of the FUSE loop
# device alone, at 56 ms each behind a busy CPU. So the rules it reads first (from the /run
# it gets) mark them as devices to leave alone, the way device-mapper's own rules do for
# devices that are not ready. Device names from the root stage (verity.DM_NAME,
# localcopy.MIX_NAME), loop devices by their backing file, which is always on one of ours.
UDEV_RULES = "00-seedboot.rules"


def udev_rules(run: str, cache: str, dm_names: tuple[str, ...]) -> str:
    backing = f"{run}/*|{cache}/*"
    names = "|".join(dm_names)
    return f"""\
# seedboot: the boot's own block devices (written by the miniroot, gone at the next boot)
SUBSYSTEM!="block", GOTO="seedboot_end"
ACTION=="remove", GOTO="seedboot_end"
KERNEL=="loop[0-9]*", ATTR{{loop/backing_file}}=="{backing}", GOTO="seedboot_own"
KERNEL=="dm-[0-9]*", ATTR{{dm/name}}=="{names}", GOTO="seedboot_own"
GOTO="seedboot_end"
LABEL="seedboot_own"
ENV{{UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG}}="1"
ENV{{DM_UDEV_DISABLE_DISK_RULES_FLAG}}="1"
ENV{{DM_UDEV_DISABLE_OTHER_RULES_FLAG}}="1"
OPTIONS+="nowatch"
LABEL="seedboot_end"
"""


def hide_own_devices(ctx: Context) -> None:
    from seedboot.agent.localcopy import MIX_NAME
    from seedboot.agent.verity import DM_NAME

    rules = ctx.paths.run.parent / "udev" / "rules.d"
    try:
        rules.mkdir(parents=True, exist_ok=True)
        text = udev_rules(str(ctx.paths.run), str(ctx.paths.cache), (DM_NAME, MIX_NAME))
        (rules / UDEV_RULES).write_text(text)
    except OSError as e:
        log.warning("cannot write %s: %s; the booted OS's udev will probe seedboot's devices", rules, e)
        return
    log.info("udev: %s marks seedboot's loop and device-mapper devices as not to probe", rules / UDEV_RULES)


def run(ctx: Context) -> str:
    newroot = str(ctx.paths.newroot)
    init = init_path(ctx)
    if not has_init(ctx.paths.newroot, init):
        raise SeedError(f"the new root has no {init}", "boot with init=PATH")
    if os.getpid() != 1:
        raise SeedError("switch: not PID 1; refusing to take over this machine's root", "")
    shutdown_note = clean_shutdown(ctx)
    hide_own_devices(ctx)
    knx = ctx.paths.run / "knxblock"
    if sc.is_mountpoint(str(ctx.paths.cache)):
        knx.mkdir(parents=True, exist_ok=True)
        sc.mount(str(ctx.paths.cache), str(knx), None, sc.MS_BIND)
    os.chdir(newroot)
    freed = 0
    if root_is_ram():
        freed = delete_contents("/", os.stat("/").st_dev)
    for d in KERNEL_MOUNTS:
        target = os.path.join(newroot, d)
        os.makedirs(target, exist_ok=True)
        sc.mount(f"/{d}", target, None, sc.MS_BIND | sc.MS_REC)
    line = timing_line(ctx)
    ctx.console.note(line)
    log.info("%s", line)
    ctx.console.stage("switch", "ok", 0.0, f"freed {freed} initramfs entries; exec {init}{shutdown_note}")
    sc.mount(newroot, "/", None, sc.MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    env = {
        "HOME": "/",
        "TERM": "linux",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    os.execve(init, [init], env)
    raise AssertionError("unreachable")
