"""Stage 7: start the block device daemon and wait until ``disk.img`` answers a read.

The daemon is a separate exec of this same binary (``seedboot.agent.daemon.spawn``) with
argv[0] ``@seedboot-blockdev``: systemd spares ``@`` processes at switch-root and shutdown.
It re-reads the release this boot just verified from the cache (``--cached-release``, the
signature is checked again) and does not probe the mirrors again (``--no-probe``: they come
ranked from the mirror stage). Its runtime lives in /run/seedboot, which survives the
switch; its log is /run/seedboot/blockdev.log. PID 1 itself never imports FUSE or trio.
"""

from __future__ import annotations

import time
from pathlib import Path

from seedboot.agent.errors import SeedError
from seedboot.agent.stages import Context

ARGV0 = "@seedboot-blockdev"


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


def run(ctx: Context) -> str:
    from seedboot.agent.daemon import MountOptions, spawn

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
        conns=ctx.cmdline.conns or 32,
        offline=offline,
        record=record,
        probe=False,
        cached_release=True,
        log=ctx.paths.blockdev_log,
        argv0=ARGV0,
    )
    start = time.monotonic()
    try:
        pid = spawn(opts)
    except SeedError:
        show_log_tail(ctx)
        raise
    ctx.timings["daemon-start"] = time.monotonic() - start
    ctx.daemon_pid = pid
    size = rel.meta.image_size / 2**20
    detail = f"{mountpoint}/disk.img ({size:.0f} MiB) served by pid {pid} ({ARGV0})"
    detail += f", prefetch {ctx.cmdline.prefetch}"
    if offline:
        detail += ", offline"
    if record is not None:
        detail += f", recording to {record}"
    return detail
