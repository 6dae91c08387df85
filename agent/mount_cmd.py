"""Commands of the block device: ``mount``, ``umount``, ``status``, ``profile merge``.

The same ``add_parser(sub)`` serves the ``seedboot`` CLI (tools/cli.py) and the miniroot's
frozen agent (``seedboot-agent mount ...``: its ``main`` hands these subcommands to
``add_parser``/``func``, or simply calls ``mount_cmd.main(argv)``).
``python -m seedboot.agent.mount_cmd mount ...`` works too (that is how a venv daemon re-executes).

    mount --mirror URL [--mirror URL ...] --name NAME --pubkey KEY.pub --cache DIR
          [--version N] [--prefetch profile|all|off] [--conns N] [--offline] [--record FILE]
          [--foreground] [--cache-max SIZE] [--log FILE] [--no-probe] [--cached-release]
          [--argv0 NAME] [--expiry-tolerance SECONDS] MOUNTPOINT

For the boot (stages):
- ``--no-probe``: use the mirrors in the order given (the mirror stage already ranked them).
- ``--cached-release``: take the metadata + index of ``--version`` (default: the cache's
  ``NAME/latest``) from ``--cache``, where the trust stage saved them with
  ``release.save_release``; the signature is verified again locally. Blocks still come from
  the mirrors.
- ``--argv0 @seedboot-blockdev``: the daemon's argv[0] (systemd spares '@' processes at
  switch-root and shutdown). Without ``--foreground`` the daemon is started with it; with
  ``--foreground`` the process re-executes itself with it (same pid).
- ``--log FILE``: the daemon's log (default ``CACHE/seedboot-mount.log`` when backgrounded;
  stderr with ``--foreground``). Must not live on the served device.
- The daemon sets its oom_score_adj to -1000, holds a bounded amount of memory, and
  ignores SIGTERM while the mount is busy (it may be the root filesystem).
- ``umount MOUNTPOINT`` fails with a clear message while a loop device uses the image.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seedboot.agent import profile as profilemod
from seedboot.agent.atomic import write_atomic
from seedboot.agent.errors import SeedError, report
from seedboot.agent.mount_options import MountOptions
from seedboot.agent.procfs import stat_fields

log = logging.getLogger(__name__)

_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mount",
        help="expose a published image as MOUNTPOINT/disk.img (read-only, fetched on demand)",
        description="Mount an image from HTTP mirrors as MOUNTPOINT/disk.img: blocks are fetched on "
        "demand and ahead of demand, verified against the signed index, and cached.",
    )
    p.add_argument(
        "--mirror", action="append", default=[], metavar="URL", help="mirror base URL (repeatable)"
    )
    p.add_argument("--name", required=True, help="image name on the mirrors")
    p.add_argument("--pubkey", action="append", default=[], type=Path, metavar="KEY.pub", help="trusted key")
    p.add_argument(
        "--cache", required=True, type=Path, metavar="DIR", help="block cache (laid out like a mirror)"
    )
    p.add_argument(
        "--version", type=int, help="image version (default: the newest; older ones only when named)"
    )
    p.add_argument("--prefetch", choices=("profile", "all", "off"), default="profile")
    p.add_argument(
        "--conns",
        type=int,
        default=MountOptions.conns,
        help=f"transfers in flight (default {MountOptions.conns}, hides ~100 ms)",
    )
    p.add_argument("--offline", action="store_true", help="use only the cache and its verified release")
    p.add_argument("--record", type=Path, metavar="FILE", help="write the first-read order of blocks here")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground until unmounted")
    p.add_argument(
        "--cache-max", type=parse_size, metavar="SIZE", help="evict above SIZE (default: 90%% of the fs)"
    )
    p.add_argument("--log", type=Path, metavar="FILE", help="daemon log file")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="use mirrors in the order given")
    p.add_argument("--cached-release", action="store_true", help="take the verified release from --cache")
    p.add_argument("--argv0", metavar="NAME", help="the daemon's argv[0] (e.g. @seedboot-blockdev)")
    p.add_argument(
        "--expiry-tolerance", type=int, default=0, metavar="SECONDS", help="accept expired metadata"
    )
    p.add_argument(
        "--local-copy",
        action="store_true",
        help="also keep the blocks read, decompressed, in CACHE/NAME/copy/<index>.img "
        "(the miniroot maps them under dm-verity on the next boot)",
    )
    p.add_argument(
        "--quiesce-remount",
        action="store_true",
        help="on SIGUSR1 (the machine shuts down; writes to the cache stop) also remount the "
        "cache's file system read-only, so it is left clean (the miniroot's cache partition)",
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=run_mount)

    u = sub.add_parser("umount", help="stop serving MOUNTPOINT (fails while it is in use)")
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    u.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon to exit")
    u.set_defaults(func=run_umount)

    s = sub.add_parser("status", help="what the block device at MOUNTPOINT is doing")
    s.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    s.add_argument("--json", action="store_true", help="print the raw status JSON")
    s.set_defaults(func=run_status)

    pr = sub.add_parser("profile", help="boot profiles")
    psub = pr.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    m = psub.add_parser("merge", help="merge boot traces into a profile (blocks read early in most first)")
    m.add_argument("traces", nargs="+", type=Path, metavar="TRACE")
    m.add_argument("--out", required=True, type=Path, metavar="PROFILE")
    m.set_defaults(func=run_profile_merge)


def _options(args: argparse.Namespace) -> MountOptions:
    if args.conns < 1 or args.conns > 256:
        raise SeedError(f"--conns {args.conns} is out of range", "use 1..256")
    if args.offline and args.cached_release:
        args.cached_release = False
    return MountOptions(
        mountpoint=args.mountpoint.absolute(),
        name=args.name,
        pubkeys=[p.absolute() for p in args.pubkey],
        cache=args.cache.absolute(),
        mirrors=list(args.mirror),
        version=args.version,
        prefetch=args.prefetch,
        conns=args.conns,
        offline=args.offline,
        record=args.record.absolute() if args.record else None,
        cache_max=args.cache_max,
        probe=args.probe,
        cached_release=args.cached_release,
        expiry_tolerance=args.expiry_tolerance,
        log=args.log.absolute() if args.log else None,
        argv0=args.argv0,
        local_copy=args.local_copy,
        quiesce_remount=args.quiesce_remount,
    )


def _log_to(path: Path | None, stderr: bool) -> None:
    root = logging.getLogger()
    fmt = logging.Formatter("%(asctime)s seedboot-blockdev[%(process)d] %(name)s: %(message)s")
    for h in list(root.handlers):
        root.removeHandler(h)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if stderr or path is None:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def run_mount(args: argparse.Namespace) -> int:
    from seedboot.agent import daemon

    opts = _options(args)
    if not opts.pubkeys:
        raise SeedError("no trusted public key given", "pass --pubkey KEY.pub")
    if not args.foreground:
        pid = daemon.spawn(opts)
        print(f"{opts.mountpoint}/disk.img served by pid {pid}")
        return 0
    if opts.argv0 and daemon.current_argv0() != opts.argv0:
        daemon.reexec_as(
            opts.argv0, [*opts.to_argv()[:-1], "--foreground", *_ready_arg(args), str(opts.mountpoint)]
        )
    # a daemon writes its log to the file only; stderr would be the same file
    _log_to(opts.log, stderr=args.ready_fd is None)
    try:
        return daemon.serve(opts, args.ready_fd)
    except SeedError as e:
        log.error("%s", e)
        daemon.report_failure(args.ready_fd, e)
        raise
    except Exception as e:
        log.exception("mount failed")
        daemon.report_failure(args.ready_fd, SeedError(f"mount failed: {e!r}", "see the log"))
        raise


def _ready_arg(args: argparse.Namespace) -> list[str]:
    return ["--ready-fd", str(args.ready_fd)] if args.ready_fd is not None else []


def read_status(mountpoint: Path) -> dict[str, Any]:
    path = mountpoint / "status.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise SeedError(f"{mountpoint} is not a seedboot mount", "seedboot mount ... MOUNTPOINT first") from e
    except OSError as e:
        raise SeedError(f"cannot read {path}: {e.strerror}", "is the daemon still running?") from e
    result: dict[str, Any] = json.loads(data)
    return result


def run_umount(args: argparse.Namespace) -> int:
    from seedboot.agent import daemon

    mp = args.mountpoint.absolute()
    try:
        pid = int(read_status(mp)["pid"])
    except SeedError:
        pid = 0
    err = daemon.umount(mp)
    if err:
        hint = "detach loop devices (losetup -d) and unmount what is mounted from it first"
        raise SeedError(err, hint if "busy" in err else "check the mount point")
    deadline = time.monotonic() + args.timeout
    while pid and time.monotonic() < deadline:
        if not _running(pid):
            break
        time.sleep(0.05)
    else:
        if pid:
            raise SeedError(f"unmounted, but daemon {pid} is still running after {args.timeout:.0f}s")
    print(f"{mp}: unmounted")
    return 0


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphaned daemon waits for init to reap it)."""
    try:
        state = stat_fields(f"/proc/{pid}/stat")[0]
    except OSError:
        return False
    return state != "Z"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def format_status(s: dict[str, Any]) -> str:
    c = s["counters"]
    lines = [
        f"image     {s['name']} v{s['version']}  {_mb(s['image_size'])}, {s['nblocks']} blocks of "
        f"{s['block_size'] // 1024} KiB  (pid {s['pid']}, up {s['uptime']:.0f}s, RSS {_mb(s['rss'])})",
    ]
    if s["offline"]:
        lines.append("mirrors   offline: cache only")
    else:
        for i, m in enumerate(s["mirrors"]):
            tag = "in use " if i == 0 else "       "
            ttfb = "not probed" if m["ttfb_ms"] is None else f"probe {m['ttfb_ms']} ms"
            extra = f", backed off {m['backed_off_s']}s" if m["backed_off_s"] else ""
            err = f", last error: {m['last_error']}" if m["last_error"] else ""
            lines.append(
                f"mirror {i + 1}  {tag}{m['url']}  ({ttfb}; {m['fetched']} blocks, "
                f"{_mb(m['bytes'])}, {m['errors']} errors{extra}{err})"
            )
    lines.append(
        f"blocks    read from memory {c['from_memory']}, from cache {c['from_cache']}; fetched on demand "
        f"{c['fetched']}, read-ahead {c['readahead']}, prefetched {c['prefetched']}"
    )
    lines.append(
        f"network   {_mb(c['fetched_bytes'])} fetched; now {_mb(s['throughput_current'])}/s, "
        f"average {_mb(s['throughput_average'])}/s"
    )
    pf = s["prefetch"]
    if "total" in pf:
        state = "complete" if pf["complete"] else "running"
        lines.append(
            f"prefetch  {pf['what']}: {pf['done']}/{pf['total']} blocks, {pf['failed']} failed, {state}"
        )
    else:
        lines.append(f"prefetch  {pf['what']}")
    lines.append(f"errors    {c['errors']} failed reads, {c['cache_dropped']} bad cached blocks dropped")
    cu = s["cache"]
    limit = (
        f"limit {_mb(cu['limit'])}"
        if cu["limit"]
        else f"filesystem {cu['fs_used'] * 100 // max(cu['fs_total'], 1)}% used"
    )
    later = f" ({s['writing_later']} once the machine idles)" if s.get("writing_later") else ""
    writing = f", {s['writing']} being written{later}" if s.get("writing") else ""
    lines.append(
        f"cache     {cu['blocks']} blocks, {_mb(cu['bytes'])} ({limit}), {cu['evicted']} evicted{writing}"
    )
    cpu = s["cpu"]
    threads = ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu["threads"].items(), key=lambda kv: -kv[1]))
    start = f"{cpu['to_start']:.2f} s of it to start"
    cp = s.get("copy")
    if cp:
        stop = f"; stopped: {cp['stopped']}" if cp["stopped"] else ""
        stop = stop or ("" if cp.get("room", True) else "; paused: the cache file system is short of room")
        lines.append(
            f"copy      {cp['blocks']} of {s['nblocks']} blocks in {cp['path']}, {cp['queued']} queued{stop}"
        )
    q = s.get("quiesced")
    if q:
        state = f"done: {', '.join(q['steps'])}; cache {q['cache']}" if q["done"] else "under way"
        lines.append(f"shutdown  SIGUSR1 at {time.strftime('%H:%M:%S', time.localtime(q['at']))}, {state}")
    lines.append(f"cpu       {cpu['total']:.2f} s ({start}); threads: {threads}")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    s = read_status(args.mountpoint)
    print(json.dumps(s, indent=1) if args.json else format_status(s))
    return 0


def run_profile_merge(args: argparse.Namespace) -> int:
    traces: list[list[int]] = []
    nblocks: int | None = None
    for path in args.traces:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SeedError(f"cannot read trace {path}: {e.strerror}") from e
        m = re.match(rb"[^\n]*blocks=(\d+)", data)
        if m:
            n = int(m.group(1))
            if nblocks is not None and n != nblocks:
                raise SeedError(f"{path} is a trace of an image with {n} blocks, the others have {nblocks}")
            nblocks = n
        traces.append(profilemod.parse(data, str(path), nblocks))
    merged = profilemod.merge(traces)
    write_atomic(args.out, profilemod.encode(merged, nblocks=nblocks))
    print(f"{args.out}: {len(merged)} blocks from {len(traces)} traces")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seedboot-blockdev")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SeedError as e:
        report(f"seedboot {args.command}", e)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
