"""Stage 7: start the block device daemon and wait until ``disk.img`` answers a read.

The daemon is forked from PID 1 at the early stage (``seedboot.agent.prewarm``), where it
imports its modules while the other stages run, and is handed its mount command line here;
without that (not frozen, or it died), a separate exec of this binary
(``seedboot.agent.daemon.spawn``). Either way its argv[0] is ``@seedboot-blockdev``: systemd
spares ``@`` processes at switch-root and shutdown.
It re-reads the release this boot just verified from the cache (``--cached-release``, the
signature is checked again) and does not probe the mirrors again (``--no-probe``: they come
ranked from the mirror stage). Its runtime lives in /run/seedboot, which survives the
switch; its log is /run/seedboot/blockdev.log. PID 1 itself never imports FUSE.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from seedboot.agent.errors import SeedError
from seedboot.agent.prewarm import Child, fork_daemon
from seedboot.agent.stages import Context

if TYPE_CHECKING:
    from seedboot.agent.metadata import Verity
    from seedboot.agent.verity import TreeFetch

log = logging.getLogger(__name__)

ARGV0 = "@seedboot-blockdev"
READY_TIMEOUT = 120.0
# What PID 1's later stages import and the daemon imports too (import_shared)
SHARED_MODULES = (
    "seedboot.agent.release",
    "seedboot.agent.localcopy",
    "seedboot.agent.verity",
    "seedboot.agent.quiesce",
    "zstandard",
)
# the same for what only fetching needs (the mirror stage's probes, the daemon's fetcher)
SHARED_NETWORK_MODULES = ("pycurl", "seedboot.agent.mirrors", "seedboot.agent.reader")
SAY_AFTER = 3.0


@dataclass
class Prewarmed:
    """A daemon process started early (forked into ``blockdev_wait``), importing its modules."""

    proc: Child
    opts_w: int  # write its mount command line here
    ready_r: int  # it writes "ok" (or "message\thint") here once it serves
    ready_w: int  # its end, passed as --ready-fd
    log: Path


def frozen() -> bool:
    return Path(sys.executable).name.startswith("seedboot-agent")


def import_shared(offline: bool) -> None:
    """Import, before the fork, what both PID 1's later stages and the daemon import: the
    child then has them (copy-on-write) instead of importing them a second time on the one
    CPU, and PID 1 only imports them earlier than it would have."""
    import importlib

    for name in SHARED_MODULES + (() if offline else SHARED_NETWORK_MODULES):
        try:
            importlib.import_module(name)
        except ImportError as e:  # the daemon's own import says what is missing, in its stage
            log.warning("cannot import %s: %s", name, e)


def prewarm(ctx: Context) -> Prewarmed | None:
    """Start the daemon's process now; ``run`` hands it the command line later."""
    if not frozen():
        return None  # stages run on a host by tests: the daemon starts in its own stage
    import_shared(ctx.cmdline.offline)
    if threading.active_count() > 1:
        # a fork copies no other thread, so a lock one of them holds would stay held in the
        # child forever: start the daemon in its stage instead (never the case at early)
        log.warning("not forking the block daemon early: PID 1 already runs threads")
        return None
    opts_r, opts_w = os.pipe()
    ready_r, ready_w = os.pipe()
    ctx.paths.run.mkdir(parents=True, exist_ok=True)
    logpath = ctx.paths.blockdev_log
    try:
        proc = fork_daemon(ARGV0, opts_r, logpath, (opts_w, ready_r), offline=ctx.cmdline.offline)
    except OSError:
        for fd in (opts_w, ready_r, ready_w):
            os.close(fd)
        raise
    finally:
        os.close(opts_r)
    log.debug("block daemon %d forked early (importing)", proc.pid)
    return Prewarmed(proc, opts_w, ready_r, ready_w, logpath)


def cancel(p: Prewarmed) -> None:
    for fd in (p.opts_w, p.ready_r, p.ready_w):
        with contextlib.suppress(OSError):
            os.close(fd)
    p.proc.wait()


def wait_ready(p: Prewarmed, timeout: float = READY_TIMEOUT, say: Callable[[], None] | None = None) -> str:
    """The daemon's readiness message: "ok", or "message<TAB>hint"; bounded by TIMEOUT.
    ``say`` is called once if it takes more than a few seconds (the console says why)."""
    buf = b""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if say is not None and time.monotonic() - start > SAY_AFTER:
            say()
            say = None
        r, _, _ = select.select([p.ready_r], [], [], 0.2)
        if r:
            chunk = os.read(p.ready_r, 4096)
            if not chunk:
                break
            buf += chunk
            if buf.endswith(b"\n"):
                break
        elif p.proc.poll() is not None:
            break
    else:
        return f"the block daemon did not come up within {timeout:.0f}s"
    text = buf.decode("utf-8", "replace").strip()
    return text or f"the block daemon exited (status {p.proc.poll()})"


def start_prewarmed(p: Prewarmed, argv: list[str], mountpoint: Path, ctx: Context) -> int:
    full = [*argv[:-1], "--foreground", "--ready-fd", str(p.ready_w), argv[-1]]
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, p.proc.pid, 0)  # it was importing at nice 10
    os.write(p.opts_w, json.dumps(full).encode())
    os.close(p.opts_w)
    os.close(p.ready_w)  # the daemon holds its own copy
    msg = wait_ready(
        p, say=lambda: ctx.console.waiting(f"the block daemon to serve {mountpoint}/disk.img", READY_TIMEOUT)
    )
    os.close(p.ready_r)
    if msg != "ok":
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait()
        message, _, hint = msg.partition("\t")
        raise SeedError(message, hint or f"see {p.log}")
    with open(mountpoint / "disk.img", "rb") as f:  # the promise: a read works now
        f.read(4096)
    return p.proc.pid


def start_tree_fetch(ctx: Context, name: str, v: Verity) -> TreeFetch:
    """The dm-verity tree of NAME, fetched in the background from the chosen mirror (offline,
    only the cache's copy will do)."""
    from seedboot.agent import verity
    from seedboot.agent.reader import HttpReader

    reader = HttpReader(ctx.mirror) if ctx.mirror and not ctx.cmdline.offline else None
    return verity.fetch_tree_in_background(name, v, ctx.paths.cache, reader)


def trace_path(ctx: Context, name: str, version: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return ctx.paths.cache / "traces" / f"{name}-{version}-{stamp}.trace"


def show_log_tail(ctx: Context, lines: int = 15) -> None:
    """The daemon's last words, on the console: its log is in /run, gone after a reboot."""
    try:
        tail = ctx.paths.blockdev_log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    for line in tail:
        ctx.console.note(f"blockdev.log: {line}")


def wants_copy(ctx: Context) -> bool:
    """Keep a local copy of the blocks read (agent/localcopy.py): only on a cache partition,
    and only under dm-verity, the one check of bytes that bypass the block daemon."""
    rel = ctx.release
    return ctx.cmdline.copy and ctx.cache_kind == "disk" and rel is not None and rel.meta.verity is not None


def run(ctx: Context) -> str:
    from seedboot.agent.stages.hardware import wait_quick

    wait_quick(ctx)  # fuse (the slow disk drivers may go on loading: the root stage settles them)
    from seedboot.agent.mount_options import MountOptions

    rel = ctx.release
    if rel is None:
        raise SeedError("no verified release to serve", "the trust stage did not run")
    name, version = rel.meta.name, rel.meta.version
    record = None
    if ctx.cmdline.record:
        record = trace_path(ctx, name, version)
        record.parent.mkdir(parents=True, exist_ok=True)
    ctx.trace = record
    mountpoint = ctx.paths.mountpoint
    mountpoint.mkdir(parents=True, exist_ok=True)
    offline = ctx.cmdline.offline or not ctx.mirrors
    opts = MountOptions(
        mountpoint=mountpoint,
        name=name,
        pubkeys=sorted(ctx.paths.keys.glob("*.pub")),
        cache=ctx.paths.cache,
        mirrors=[] if offline else list(ctx.mirrors),
        version=version,
        prefetch=ctx.cmdline.prefetch,
        conns=ctx.cmdline.conns or MountOptions.conns,
        offline=offline,
        record=record,
        probe=False,
        cached_release=True,
        log=ctx.paths.blockdev_log,
        argv0=ARGV0,
        local_copy=wants_copy(ctx),
        # not under a persistent overlay: its upper layer is on the partition, and services that
        # stop after the shutdown unit (random seed, wtmp) still write there
        quiesce_remount=ctx.cache_kind == "disk" and ctx.cmdline.overlay != "persist",
    )
    if rel.meta.verity is not None:
        # The root stage needs the dm-verity tree (8 MB for 1 GiB); fetch it while the daemon
        # comes up: at 100 ms the transfer's round trips overlap the wait.
        ctx.verity_fetch = start_tree_fetch(ctx, name, rel.meta.verity)
    start = time.monotonic()
    pre = ctx.prewarmed
    ctx.prewarmed = None
    if pre is not None and pre.proc.poll() is not None:
        log.warning("the early block daemon exited (status %s); starting another", pre.proc.returncode)
        cancel(pre)
        pre = None
    try:
        if pre is not None:
            pid = start_prewarmed(pre, opts.to_argv(), mountpoint, ctx)
        else:  # not forked early, or that one died: PID 1 waits for all of the daemon's start
            from seedboot.agent.daemon import spawn

            pid = spawn(opts)
    except SeedError:
        show_log_tail(ctx)
        raise
    ctx.timings["daemon-start"] = time.monotonic() - start
    ctx.daemon_pid = pid
    size = rel.meta.image_size / 2**20
    how = "forked early" if pre is not None else "started now"
    detail = f"{mountpoint}/disk.img ({size:.0f} MiB) served by pid {pid} ({ARGV0}, {how})"
    detail += f", prefetch {ctx.cmdline.prefetch}"
    if offline:
        detail += ", offline"
    if record is not None:
        detail += f", recording to {record}"
    if opts.local_copy:
        detail += ", keeping a local copy"
    return detail
