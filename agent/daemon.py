"""Assemble and run the block device daemon: trust, cache, fetcher, FUSE, background start.

``serve(opts)`` runs in the foreground until the mount goes away. ``spawn(opts)`` starts the
daemon as a child (re-executing this program with ``--foreground --ready-fd N`` and the
requested argv[0]) and returns once the mount answers reads, or raises the child's error.

argv[0]: systemd spares processes whose argv[0] starts with ``@`` at switch-root and
shutdown (the root-storage-daemon convention); it reads /proc/PID/cmdline, so the daemon is
exec'ed with that argv[0]. A frozen agent (``sys.executable`` is ``seedboot-agent``) finds
its runtime through /proc/self/exe and takes the subcommand directly; a venv Python is run
as ``python -m seedboot.agent.mount_cmd`` with PYTHONEXECUTABLE so that it still finds its
prefix although argv[0] is not its path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seedboot.agent import layout
from seedboot.agent import profile as profilemod
from seedboot.agent.atomic import write_atomic
from seedboot.agent.blockdev import BlockDevice, Prefetcher, ReadAhead, Recorder, mirrors_status
from seedboot.agent.cache import BlockCache
from seedboot.agent.errors import SeedError
from seedboot.agent.fetcher import DEMAND, PREFETCH, Fetcher
from seedboot.agent.localcopy import (
    SETTLED_GIVE_UP,
    SETTLED_POLL,
    VERITY_DATA,
    VERITY_METADATA,
    LocalCopy,
    progress_mark,
    settled,
    settled_flag,
    watch_verity_errors,
)
from seedboot.agent.mirrors import MirrorSet, probe
from seedboot.agent.mount_options import MountOptions as MountOptions
from seedboot.agent.procfs import cpu_seconds
from seedboot.agent.quiesce import Quiesced, quiesce
from seedboot.agent.reader import DirReader, HttpReader, NotFound, get_all
from seedboot.agent.release import Release, checked_profile, load_keys, open_release, save_release
from seedboot.agent.rollback import RollbackRefused

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024
READY_TIMEOUT = 180.0
# A sequential reader's read-ahead window, in blocks: as many as transfers may be in flight
# (--conns), up to this. It is fetched into the cache, not held in memory.
READAHEAD_MAX = 128


# -- trust ---------------------------------------------------------------------------------


def _cached_latest(cache: Path, name: str) -> int:
    try:
        text = (cache / layout.latest_path(name)).read_text().strip()
    except FileNotFoundError:
        text = ""
    if not text.isdigit():
        raise SeedError(
            f"no verified release of {name!r} in cache {cache}",
            "mount once online first (without --offline / --cached-release)",
        )
    return int(text)


def open_trusted(opts: MountOptions, cache: BlockCache) -> tuple[Release, MirrorSet | None]:
    keys = load_keys(opts.pubkeys)
    mirrors: MirrorSet | None = None
    if not opts.offline:
        if not opts.mirrors:
            raise SeedError("no mirror given", "pass --mirror URL (or --offline to use the cache only)")
        if opts.probe and len(opts.mirrors) > 1:
            mirrors = probe(opts.mirrors, layout.latest_path(opts.name))
        else:
            mirrors = MirrorSet.from_urls(opts.mirrors)
    if opts.offline or opts.cached_release:
        version = opts.version if opts.version is not None else _cached_latest(opts.cache, opts.name)
        try:
            # the signature is checked again here: the cache is only a place, not a trust anchor
            rel = open_release(DirReader(opts.cache), opts.name, keys, version, **_trust_args(opts))
        except NotFound as e:
            raise SeedError(
                f"version {version} of {opts.name!r} is not in cache {opts.cache}",
                "mount once online first, or pick a cached --version",
            ) from e
    else:
        assert mirrors is not None
        rel = _open_from_mirrors(opts, mirrors, keys)
    if not (opts.offline or opts.cached_release):
        save_release(opts.cache, rel)
    return rel, mirrors


def _trust_args(opts: MountOptions) -> dict[str, Any]:
    # Rollback protection lives in the cache (rollback.py): an older version than seen is
    # refused unless --version names it; the cache's keys statement covers offline mounts.
    return {
        "tolerance": opts.expiry_tolerance,
        "state_dir": opts.cache,
        "allow_older": opts.version is not None,
        "keys_fallback": DirReader(opts.cache),
    }


def _open_from_mirrors(opts: MountOptions, mirrors: MirrorSet, keys: list[Any]) -> Release:
    errors: list[str] = []
    for m in mirrors.order():
        try:
            return open_release(
                HttpReader(m.url),
                opts.name,
                keys,
                opts.version,
                with_profile=opts.prefetch == "profile",
                **_trust_args(opts),
            )
        except RollbackRefused:
            raise
        except SeedError as e:
            errors.append(f"{m.url}: {e.message}")
            mirrors.failed(m, e.message)
    raise SeedError(
        f"no mirror delivered a verified release of {opts.name!r}: " + "; ".join(errors),
        "check --mirror, --name and --pubkey",
    )


def load_profile(rel: Release, cache: Path, mirrors: MirrorSet | None) -> list[int] | None:
    digest = rel.meta.profile
    if digest is None:
        log.info("prefetch: %s v%d has no published profile", rel.meta.name, rel.meta.version)
        return None
    if rel.profile_bytes is not None:  # fetched and checked with the index (open_release)
        return profilemod.parse(rel.profile_bytes, f"profile {digest[:12]}", nblocks=rel.index.nblocks)
    path = layout.profile_path(rel.meta.name, digest)
    sources: list[Any] = [DirReader(cache)]
    if mirrors is not None:
        sources += [HttpReader(m.url) for m in mirrors.order()]
    for src in sources:
        data = checked_profile(get_all(src, [path])[0], digest, src.location)
        if data is None:
            continue
        blocks_ = profilemod.parse(data, f"profile {digest[:12]}", nblocks=rel.index.nblocks)
        if not isinstance(src, DirReader):
            write_atomic(cache / path, data)
        return blocks_
    log.warning("prefetch: profile %s not found on any mirror; prefetch off", digest[:12])
    return None


# -- the daemon ----------------------------------------------------------------------------


def _bound_memory(fit: Callable[[int], None]) -> threading.Event:
    """Block buffers (~256 KiB) come and go all the time. Served from the heap they cost no
    page faults (an mmap per buffer faults in every page, every time); two arenas instead of
    one per thread, and a trim twice a second, hand back what a burst left free; ``fit`` then
    hears the resident bytes (the block device keeps fewer blocks when over). Anything of
    1 MiB or more (libfuse's request buffer per pyfuse3 task, of which little is ever
    touched) is mmapped and so returned at once: on the heap those left ~7 MB resident while
    blocks were fetched."""
    stop = threading.Event()
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        return stop

    page = os.sysconf("SC_PAGE_SIZE")

    def trim() -> None:
        with open("/proc/self/statm", "rb") as statm:
            while not stop.wait(0.5):
                libc.malloc_trim(0)
                statm.seek(0)
                fit(int(statm.read().split()[1]) * page)

    threading.Thread(target=trim, name="trim", daemon=True).start()
    return stop


def _protect() -> None:
    try:
        Path("/proc/self/oom_score_adj").write_text("-1000\n")
    except OSError as e:
        log.info("cannot set oom_score_adj: %s", e.strerror)


def _mount_dev(mountpoint: Path) -> str | None:
    """major:minor of the mount at mountpoint (resolved before mounting: once mounted, any stat
    of it would ask this very process, whose FUSE loop is not running yet), from mountinfo."""
    target = str(mountpoint)
    dev = None
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            f = line.split()
            mp = f[4].encode().decode("unicode_escape")
            if mp == target:
                dev = f[2]
    except OSError:
        return None
    return dev


def _after_init(mountpoint: Path) -> None:
    """The kernel sets the FUSE bdi's read-ahead when the INIT handshake completes (capped at
    its 128 KiB default), so raise it afterwards: a stat (answered by the FUSE loop, this is
    another thread) waits for INIT."""
    try:
        os.stat(mountpoint)
    except OSError:
        return
    _tune_read_ahead(mountpoint)


def _tune_read_ahead(mountpoint: Path) -> None:
    dev = _mount_dev(mountpoint)
    if dev is None:
        return
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{READ_AHEAD_KB}\n")
        log.info("FUSE read-ahead set to %d KiB (bdi %s)", READ_AHEAD_KB, dev)
    except OSError as e:
        log.info("cannot set read_ahead_kb for bdi %s: %s", dev, e.strerror)


def _thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by each kind of thread (pools summed: "verify", "cache-read"...):
    under emulation the booted guest is CPU-bound, so this says where the daemon's share goes."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        # a forked process's main thread keeps the native_id of the thread that forked it
        # (PID 1's, for the early-forked block daemon): its own id is the pid
        tid = os.getpid() if t is threading.main_thread() else t.native_id
        try:
            cpu = cpu_seconds(f"/proc/self/task/{tid}/stat")
        except OSError:
            continue  # the thread ended just now
        kind = "main" if t is threading.main_thread() else t.name.rstrip("0123456789-_ ")
        out[kind] = round(out.get(kind, 0.0) + cpu, 2)
    return out


def _say_when_settled(flag: Path, progress: Callable[[], dict[str, Any]]) -> None:
    """Write "0" to FLAG now and "1" once the local copy is settled (``localcopy.settled``),
    checking every SETTLED_POLL s in this process: the root stage waits on that file instead
    of polling ``progress.json`` through FUSE. Without the file it polls as before."""

    def put(text: str) -> bool:
        try:
            write_atomic(flag, text.encode(), sync=False)
        except OSError as e:
            log.info("local copy: cannot write %s (%s); the root stage polls the mount instead", flag, e)
            return False
        return True

    def run() -> None:
        seen: tuple[object, ...] = ()
        moved = time.monotonic()
        while not settled(st := progress()):
            if progress_mark(st) != seen:
                seen, moved = progress_mark(st), time.monotonic()
            elif time.monotonic() - moved > SETTLED_GIVE_UP:
                log.info("local copy: no progress for %.0f s; %s stays 0", SETTLED_GIVE_UP, flag)
                return
            time.sleep(SETTLED_POLL)
        put("1")
        log.info("local copy: the profile and carried blocks are copied (%s)", flag)

    if put("0"):
        threading.Thread(target=run, name="copy-settled", daemon=True).start()


def _rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(opts: MountOptions, ready_fd: int | None = None) -> int:
    from seedboot.agent.fusefs import SeedFS
    from seedboot.agent.pyfuse import pyfuse3

    if not opts.mountpoint.is_dir():
        raise SeedError(f"mount point {opts.mountpoint} is not a directory", "mkdir it first")
    mountpoint = opts.mountpoint.resolve()
    cache = BlockCache(opts.cache, opts.cache_max)
    rel, mirrors = open_trusted(opts, cache)
    fetcher = Fetcher(mirrors, opts.conns).start() if mirrors is not None else None
    # read-ahead keeps as many blocks coming into the cache as transfers may be in flight
    # (that is what hides latency); memory holds what is left of its budget (blockdev.MEMORY_BLOCKS)
    dev = BlockDevice(rel.index, cache, fetcher)
    stop_trim = _bound_memory(dev.fit_memory)
    readahead = ReadAhead(dev, window=max(8, min(opts.conns, READAHEAD_MAX)), near=4)
    recorder = Recorder(opts.record, rel.index.nblocks).start() if opts.record else None
    copy = (
        LocalCopy(
            opts.cache,
            rel.meta.name,
            rel.index,
            rel.meta.index,
            dev.writing_bytes,
            lambda b: dev.wait_block(b, PREFETCH, keep=False, timeout=60),
        )
        if opts.local_copy
        else None
    )
    if rel.meta.verity is not None:
        from seedboot.agent.verity import DM_NAME, tree_path

        tree = opts.cache / tree_path(rel.meta.name, rel.meta.verity.tree)
        watch_verity_errors(DM_NAME, verity_error_handler(copy, dev, rel.meta.verity.data_block_size, tree))
    prefetcher: Prefetcher | None = None
    if fetcher is None:
        log.info("prefetch off: offline")
    elif opts.prefetch == "all":
        prefetcher = Prefetcher(dev, range(rel.index.nblocks), opts.conns, "all")
    elif opts.prefetch == "profile":
        order = load_profile(rel, opts.cache, mirrors)
        if order:
            prefetcher = Prefetcher(dev, order, opts.conns, "profile", copy=copy)
            dev.defer_prefetched = copy is not None
    t0 = time.time()
    cpu_ready = 0.0  # set once it serves
    quiesced = Quiesced()

    def status() -> bytes:
        s: dict[str, Any] = {
            "pid": os.getpid(),
            "name": rel.meta.name,
            "version": rel.meta.version,
            "index": rel.meta.index,
            "image_size": rel.index.image_size,
            "block_size": rel.index.block_size,
            "nblocks": rel.index.nblocks,
            "offline": fetcher is None,
            "started": t0,
            "uptime": time.time() - t0,
            "rss": _rss(),
            "mirrors": mirrors_status(mirrors),
            "prefetch": prefetcher.status() if prefetcher else {"what": opts.prefetch, "complete": True},
            "fetcher": vars(fetcher.snapshot()) if fetcher else None,
            "cpu": {"total": round(time.process_time(), 2), "to_start": cpu_ready, "threads": _thread_cpu()},
            **dev.status(),
            "copy": copy.status() if copy else None,
            "quiesced": vars(quiesced) if quiesced.at else None,
        }
        return (json.dumps(s, indent=1) + "\n").encode()

    def progress_now() -> dict[str, Any]:
        return {
            "prefetch": prefetcher.status() if prefetcher else {"what": opts.prefetch, "complete": True},
            "copy": copy.status() if copy else None,
            "quiesced": quiesced.done,
        }

    def progress() -> bytes:
        return (json.dumps(progress_now()) + "\n").encode()

    if copy is not None:
        _say_when_settled(settled_flag(mountpoint), progress_now)

    fs = SeedFS(dev, status, int(rel.meta.created * 1e9), readahead, recorder, copy, progress)
    options = set(pyfuse3.default_options) | {f"fsname=seedboot:{rel.meta.name}", "ro", "allow_other"}
    _protect()
    try:
        pyfuse3.init(fs, str(mountpoint), options)
    except RuntimeError as e:
        raise SeedError(
            f"cannot mount FUSE at {opts.mountpoint}: {e}", "is /dev/fuse there and the dir free?"
        ) from e
    log.info(
        "serving %s v%d (%d blocks of %d KiB) at %s/disk.img%s",
        rel.meta.name,
        rel.meta.version,
        rel.index.nblocks,
        rel.index.block_size // 1024,
        opts.mountpoint,
        ", offline" if fetcher is None else f", mirror {mirrors.current().url}" if mirrors else "",
    )
    if prefetcher is not None:
        prefetcher.start()
    cpu_ready = round(time.process_time(), 2)
    log.info("serving after %.2f s of CPU (imports, trust, mount)", cpu_ready)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fs.loop = loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, loop, mountpoint, sig)
        loop.add_signal_handler(
            signal.SIGUSR1,
            lambda: loop.run_in_executor(
                None, quiesce, quiesced, cache, dev.writer, copy, recorder, opts.quiesce_remount
            ),
        )
        tuned = loop.run_in_executor(None, _after_init, mountpoint)
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)
        await pyfuse3.main()
        await tuned

    try:
        asyncio.run(main())
    finally:
        log.info("mount %s ended; stopping", opts.mountpoint)
        if prefetcher is not None:
            prefetcher.stop()
        if recorder is not None and not quiesced.at:
            recorder.stop()
        if fetcher is not None:
            fetcher.stop()
        dev.close()
        if copy is not None and not quiesced.at:
            copy.close()
        if copy is not None:
            with contextlib.suppress(OSError):
                settled_flag(mountpoint).unlink()  # it speaks for this mount only
        stop_trim.set()
        pyfuse3.close(unmount=_mount_dev(mountpoint) is not None)
    return 0


def verity_error_handler(
    copy: LocalCopy | None, dev: BlockDevice, verity_block: int, tree: Path
) -> Callable[[int, int], None]:
    """What the daemon does when dm-verity finds a block corrupt (the disk altered or damaged
    while the machine was off):

    - a data block of the local copy leaves the copy's map at once and is copied again from a
      verified block: the read that hit it failed, the next ones and the next boot do not;
    - a block of the cached hash tree (the root stage checks only its top block against the
      signed root hash, agent/verity.py) means the cached tree is damaged: it is removed, so
      the next boot fetches it again. This boot's reads under that block keep failing."""
    from seedboot.agent.verity import forget_damaged_tree

    bs = dev.index.block_size
    dropped: list[int] = []

    def on_error(kind: int, n: int) -> None:
        if kind == VERITY_METADATA:
            if not dropped:
                dropped.append(n)
                forget_damaged_tree(tree, n)
            return
        if kind != VERITY_DATA or copy is None:
            return
        b = n * verity_block // bs
        if copy.forget(b, f"dm-verity found its data block {n} corrupt; copying it again"):

            def again(plain: bytes | None, _error: str) -> None:
                if plain is not None:
                    copy.add(b, plain)

            dev.request(b, DEMAND, again)

    return on_error


def _on_signal(loop: asyncio.AbstractEventLoop, mountpoint: Path, sig: int) -> None:
    """SIGTERM/SIGINT unmount if nothing uses the mount; a busy mount keeps being served (it
    may be the root filesystem). The unmount waits for FUSE's answers: not in the loop."""

    def attempt() -> None:
        err = umount(mountpoint)
        if err:
            log.warning("signal %d: not stopping, %s", sig, err)

    loop.run_in_executor(None, attempt)


def umount(mountpoint: Path) -> str:
    """Unmount (not lazily); '' on success, else why not."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), 0) == 0:
        return ""
    e = ctypes.get_errno()
    if e == errno.EBUSY:
        return f"{mountpoint} is busy (a loop device or a process still uses it)"
    if e == errno.EINVAL:
        return f"{mountpoint} is not mounted"
    return f"cannot unmount {mountpoint}: {os.strerror(e)}"


# -- background start ----------------------------------------------------------------------


def is_frozen() -> bool:
    return bool(getattr(sys, "frozen", False)) or Path(sys.executable).name.startswith("seedboot-agent")


def self_command(argv0: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv (argv[0] as requested) and environment to run this agent's ``args`` again."""
    if is_frozen():
        return [argv0, *args], dict(os.environ)
    env = {**os.environ, "PYTHONEXECUTABLE": sys.executable}
    return [argv0, "-m", "seedboot.agent.mount_cmd", *args], env


def reexec_as(argv0: str, args: list[str]) -> None:
    """Replace this process by itself with argv[0] set (same pid)."""
    argv, env = self_command(argv0, args)
    log.info("re-executing as %s", argv0)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def current_argv0() -> str:
    try:
        return Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return sys.argv[0]


def spawn(opts: MountOptions) -> int:
    """Start the daemon in its own session and wait until it serves; returns its pid."""
    r, w = os.pipe()
    argv0 = opts.argv0 or "seedboot-blockdev"
    argv, env = self_command(
        argv0, [*opts.to_argv()[:-1], "--foreground", "--ready-fd", str(w), str(opts.mountpoint)]
    )
    logpath = opts.log or (opts.cache / "seedboot-mount.log")
    opts.cache.mkdir(parents=True, exist_ok=True)
    with open(logpath, "ab") as logf:
        child = subprocess.Popen(
            argv,
            executable=sys.executable,
            env=env,
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            cwd="/",
        )
    os.close(w)
    msg = _read_ready(r, child)
    os.close(r)
    if msg != "ok":
        if child.poll() is None:
            child.kill()
        child.wait()
        message, _, hint = msg.partition("\t")
        raise SeedError(
            message or f"the mount daemon exited (status {child.returncode})", hint or f"see {logpath}"
        )
    # the promise: a read of the image works now
    with open(opts.mountpoint / "disk.img", "rb") as f:
        f.read(4096)
    log.info("daemon %d serves %s (log %s)", child.pid, opts.mountpoint, logpath)
    return child.pid


def _read_ready(r: int, child: subprocess.Popen[bytes]) -> str:
    buf = b""
    deadline = time.monotonic() + READY_TIMEOUT
    done = threading.Event()

    def reader() -> None:
        nonlocal buf
        while chunk := os.read(r, 4096):
            buf += chunk
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    while not done.wait(0.1):
        if time.monotonic() > deadline:
            return f"the mount daemon did not come up within {READY_TIMEOUT:.0f}s"
        if child.poll() is not None and not done.wait(0.5):
            break
    return buf.decode("utf-8", "replace").strip()


def report_failure(ready_fd: int | None, e: SeedError) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, f"{e.message}\t{e.hint}\n".encode())
        os.close(ready_fd)
    except OSError:
        pass
