"""The block cache: a directory laid out like a mirror, so it can be served as one.

    DIR/blocks/ab/<digest>        stored (zstd) bytes, exactly as on a mirror
    DIR/NAME/meta, index, ...     the verified release files (``release.save_release``)
    DIR/.trust/state.json         the newest versions accepted (rollback.py)

A block file only ever appears complete: it is written to a temporary name, made durable,
and renamed. Durable is one ``syncfs`` of the cache's filesystem shared by all the writers
waiting at that moment (a group commit): the same guarantee as an fsync per file, with one
journal commit and one disk flush for the lot; fetched blocks go through ``BatchWriter``,
so a burst of them (a boot's profile) shares a few syncs. The directory is not fsynced:
after a power loss a block may be missing, which costs one refetch, never a wrong byte. A
stale temporary file from a crash is removed at open. Whatever is on disk is verified
against the index the first time a mount reads it, so even a damaged file is caught and
dropped, not served.

Eviction is by watermark: above the high mark (``--cache-max``, or 90% of the cache's
filesystem) the least recently used blocks go until the cache is under the low mark (75% of
either), skipping the blocks someone is waiting on (``pinned``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent import layout
from seedboot.agent.errors import SeedError

log = logging.getLogger(__name__)

HIGH = 0.90
LOW = 0.75
TOUCH_EVERY = 600.0
FREEZE_WAIT = 30.0  # seconds freeze() waits for the writes under way (a batch and its sync)
# BatchWriter: a batch is synced at most this long after the one before, or once no block
# came for BURST_GAP (a burst ended: its last blocks land at once, not an interval later).
# Under QEMU's emulation, a syncfs every few blocks (as writers arrived) while a boot's
# profile was fetched took 3.9 s for its 174 blocks, against 2.3 s in batches (2.1 s with no
# sync at all): each one also flushes the local copy's pages and commits the journal.
SYNC_INTERVAL = 0.5
BURST_GAP = 0.1
# Blocks put ``later`` (the boot profile's, which the local copy holds for the next boot) wait,
# up to LATER_MAX bytes, until the machine idles: a poll every IDLE_POLL seconds finds the CPU
# idle at least IDLE_SHARE of the time since the last (/proc/stat). Under emulation the boot
# is CPU-bound, and their writes took ~0.5 s of it before the root was up.
LATER_MAX = 32 * 2**20
IDLE_POLL = 0.5
IDLE_SHARE = 0.5
PROC_STAT = "/proc/stat"
# Put in the writer's queue to wake it without a block: the first block put ``later`` (the
# writer then polls for idle time) and a drain (the waiting blocks go now).
_WAKE: tuple[str, bytes] = ("", b"")


def cpu_idle_ticks() -> tuple[int, int]:
    """(idle and iowait, all) clock ticks of every CPU since boot; (0, 0) if unreadable."""
    try:
        with open(PROC_STAT, "rb") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[3:5]), sum(fields[:8])


@dataclass
class CacheUse:
    blocks: int
    bytes: int
    limit: int | None
    fs_total: int
    fs_used: int
    evicted: int


class GroupSync:
    """fsync for many writers at once. ``wait`` returns once a ``syncfs`` of the filesystem
    that started after the call has finished; writers arriving while one runs share the next.
    Under QEMU's emulation, an fsync per block while a boot's profile is prefetched cost the
    booting OS about as much CPU as the fetching itself."""

    def __init__(self, directory: str) -> None:
        self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.cond = threading.Condition()
        self.started = 0  # syncs begun
        self.finished = 0  # the newest sync that has finished
        self.running = False
        self.error: OSError | None = None
        self.syncs = 0
        self.waits = 0
        libc = ctypes.CDLL(None, use_errno=True)
        self._syncfs = libc.syncfs
        self._get_errno = ctypes.get_errno

    def wait(self) -> None:
        with self.cond:
            self.waits += 1
            want = self.started + 1  # a sync that begins after this writer's data was written
            while self.finished < want:
                if self.running:
                    self.cond.wait()
                    continue
                self.running = True
                self.started += 1
                gen = self.started
                self.cond.release()
                try:
                    rc = self._syncfs(self.fd)
                    err = None if rc == 0 else OSError(self._get_errno(), "syncfs failed")
                finally:
                    self.cond.acquire()
                    self.running = False
                    self.finished = gen
                    self.syncs += 1
                    self.error = err
                    self.cond.notify_all()
            if self.error is not None and self.finished == want:
                raise self.error


def _write_temp(path: Path, data: bytes) -> Path:
    """The bytes under a temporary name beside ``path``, unique per thread (several writers
    run at once), not yet synced: ``path`` appears only once they are (``put_many``)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


class BlockCache:
    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.blocks = str(root / "blocks")
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        # digest -> stored size, least recently used first
        self.lru: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.total = 0
        self.evicted = 0
        self.pinned: Callable[[str], bool] = lambda d: False
        # why the files no longer change ("" while they may): the machine is shutting down
        # and the file system is to be left clean (``freeze``); blocks are then served, not kept
        self.frozen = ""
        self.writes = threading.Condition()  # guards active_writes: put_many calls under way
        self.active_writes = 0
        try:
            (root / "blocks").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SeedError(f"cannot create cache directory {root}: {e.strerror}", "check --cache") from e
        self.group = GroupSync(self.blocks)
        self._scan()

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        stale = 0
        for sub in os.scandir(self.root / "blocks"):
            if not sub.is_dir():
                continue
            for ent in os.scandir(sub.path):
                if ent.name.startswith("."):
                    # a temporary file left by a crash mid-write
                    os.unlink(ent.path)
                    stale += 1
                    continue
                st = ent.stat()
                found.append((st.st_mtime, ent.name, st.st_size))
        found.sort()
        for _, d, size in found:
            self.lru[d] = size
            self.total += size
        log.info(
            "cache %s: %d blocks, %.1f MB%s",
            self.root,
            len(self.lru),
            self.total / 1e6,
            f", removed {stale} partial writes" if stale else "",
        )

    def path(self, digest: str) -> Path:
        return self.root / layout.block_path(digest)

    def has(self, digest: str) -> bool:
        with self.lock:
            return digest in self.lru

    def read(self, digest: str) -> bytes | None:
        """The stored bytes, or None if not cached. The caller verifies them."""
        with self.lock:
            if digest not in self.lru:
                return None
            self.lru.move_to_end(digest)
        # plain os calls: pathlib's path building costs as much as the read of a cached block
        try:
            fd = os.open(f"{self.blocks}/{digest[:2]}/{digest}", os.O_RDONLY)
        except FileNotFoundError:
            self._forget(digest)
            return None
        try:
            size = self.lru.get(digest) or os.fstat(fd).st_size
            data = os.read(fd, size + 1)
            if len(data) <= size:
                return data
            # the file is longer than recorded: read it all, the caller's length check drops it
            return data + b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        finally:
            os.close(fd)

    def freeze(self, why: str) -> None:
        """Stop changing the cache's files; returns once no block is being written. Reads
        go on; fetched blocks are no longer kept (they are served from memory)."""
        with self.writes:
            self.frozen = why
            self.writes.wait_for(lambda: self.active_writes == 0, timeout=FREEZE_WAIT)
        log.info("cache %s: no more writes: %s", self.root, why)

    def touch(self, digest: str) -> None:
        """Record a use on disk too, so the LRU order survives a restart. A block used in
        the last ``TOUCH_EVERY`` seconds is left alone: eviction order needs no finer grain,
        and a utime per block read dirties an inode (a journal write) per block."""
        if self.frozen:
            return
        path = f"{self.blocks}/{digest[:2]}/{digest}"
        with contextlib.suppress(OSError):
            if time.time() - os.stat(path).st_mtime < TOUCH_EVERY:
                return
            os.utime(path)

    def drop(self, digest: str, why: str) -> None:
        log.warning("cache: dropping block %s: %s", digest[:16], why)
        if not self.frozen:
            with contextlib.suppress(FileNotFoundError):
                self.path(digest).unlink()
        self._forget(digest)

    def _forget(self, digest: str) -> None:
        with self.lock:
            size = self.lru.pop(digest, None)
            if size is not None:
                self.total -= size

    def put(self, digest: str, stored: bytes) -> None:
        self.put_many([(digest, stored)])

    def put_many(self, blocks: list[tuple[str, bytes]]) -> None:
        """Each block to a temporary file, one shared sync for them all, then each renamed
        into place (no directory fsync: see the module docstring). A block that cannot be
        written is skipped with a warning: it costs a refetch, not the others."""
        with self.writes:
            if self.frozen:
                return
            self.active_writes += 1  # concurrent callers still share their syncs (GroupSync)
        try:
            self._put_many(blocks)
        finally:
            with self.writes:
                self.active_writes -= 1
                self.writes.notify_all()

    def _put_many(self, blocks: list[tuple[str, bytes]]) -> None:
        temps: list[tuple[str, int, Path]] = []
        failed = False
        seen: set[str] = set()
        for digest, stored in blocks:
            with self.lock:
                if digest in self.lru or digest in seen:
                    continue
            seen.add(digest)
            try:
                temps.append((digest, len(stored), _write_temp(self.path(digest), stored)))
            except OSError as e:
                log.warning("cache: cannot write block %s: %s", digest[:16], e.strerror)
                failed = True
        try:
            if temps:
                self.group.wait()
        except OSError as e:
            log.warning("cache: cannot sync %d blocks: %s", len(temps), e.strerror)
            for _, _, tmp in temps:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            temps, failed = [], True
        for digest, size, tmp in temps:
            os.replace(tmp, self.path(digest))
            with self.lock:
                if digest not in self.lru:
                    self.lru[digest] = size
                    self.total += size
        self.evict(force=failed)

    def _fs(self) -> tuple[int, int]:
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        return total, total - st.f_bavail * st.f_frsize

    def _to_free(self, force: bool) -> int:
        if self.max_bytes is not None:
            if self.total > self.max_bytes or force:
                return self.total - int(self.max_bytes * LOW)
            return 0
        fs_total, fs_used = self._fs()
        if fs_used > fs_total * HIGH or force:
            return fs_used - int(fs_total * LOW)
        return 0

    def evict(self, force: bool = False) -> None:
        if self.frozen:
            return
        need = self._to_free(force)
        if need <= 0:
            return
        freed = 0
        victims: list[str] = []
        with self.lock:
            for d, size in self.lru.items():
                if freed >= need:
                    break
                if self.pinned(d):
                    continue
                victims.append(d)
                freed += size
            for d in victims:
                self.total -= self.lru.pop(d)
        for d in victims:
            with contextlib.suppress(FileNotFoundError):
                self.path(d).unlink()
        self.evicted += len(victims)
        log.info(
            "cache: evicted %d blocks (%.1f MB), %.1f MB left", len(victims), freed / 1e6, self.total / 1e6
        )

    def use(self) -> CacheUse:
        fs_total, fs_used = self._fs()
        with self.lock:
            return CacheUse(len(self.lru), self.total, self.max_bytes, fs_total, fs_used, self.evicted)


class BatchWriter:
    """Fetched blocks on their way to the cache, written by one thread in batches: a batch is
    what arrived until SYNC_INTERVAL after the last sync began, or until BURST_GAP passed
    without a block, or until it holds half the slots. ``put`` waits while ``slots`` blocks
    are queued (this bounds the memory a fast mirror and a slow disk can pile up); ``done``
    gets each batch's digests once they are in the cache (or failed to be: the cache logged
    why). A block put ``later`` waits (in memory, up to LATER_MAX bytes) until the machine
    idles, or until ``drain`` or ``close``: the shutdown writes it."""

    def __init__(
        self,
        cache: BlockCache,
        slots: int,
        done: Callable[[list[str]], None],
        idle: Callable[[], tuple[int, int]] = cpu_idle_ticks,
    ) -> None:
        self.cache = cache
        self.slots = threading.BoundedSemaphore(slots)
        self.max_batch = max(1, slots // 2)
        self.done = done
        self.idle = idle
        self.queue: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.queued_bytes = 0
        self.unwritten = 0  # blocks put and not yet through their batch's write
        self.later: collections.deque[tuple[str, bytes]] = collections.deque()
        self.later_bytes = 0
        self.flush = False  # drain or close: the later blocks go now
        self.written_later = 0
        self.all_written = threading.Condition(self.lock)
        self.thread = threading.Thread(target=self._run, name="cache-write", daemon=True)
        self.thread.start()

    def put(self, digest: str, stored: bytes, later: bool = False) -> None:
        with self.lock:
            later = later and not self.flush and self.later_bytes + len(stored) <= LATER_MAX
            self.queued_bytes += len(stored)
            self.unwritten += 1
            if later:
                self.later.append((digest, stored))
                self.later_bytes += len(stored)
                if len(self.later) == 1:
                    self.queue.put(_WAKE)  # the writer sleeps while nothing waits: it polls from now on
                return
        self.slots.acquire()
        self.queue.put((digest, stored))

    def close(self) -> None:
        """Write what is queued, then stop."""
        with self.lock:
            self.flush = True
        self.queue.put(None)
        self.thread.join()

    def drain(self, timeout: float) -> bool:
        """Wait until every block put so far is written (or failed to be); False on timeout."""
        with self.all_written:
            self.flush = True
            self.queue.put(_WAKE)  # the waiting blocks go now, not at the next poll
            return self.all_written.wait_for(lambda: self.unwritten == 0, timeout)

    def _run(self) -> None:
        # Not niced (as the local copy's writer is): the machine may be powered off right
        # after its reads (and the offline boot after it needs their blocks), and behind a
        # busy CPU-bound guest a nice 10 writer left a batch unwritten for seconds. Batched,
        # the writes cost little.
        last = time.monotonic() - SYNC_INTERVAL
        ticks: tuple[int, int] | None = None  # /proc/stat at the last poll, while blocks wait
        while True:
            try:
                if self.later and self.flush:
                    item = self.queue.get_nowait()
                elif self.later:  # a poll for idle time
                    item = self.queue.get(timeout=IDLE_POLL)
                else:  # nothing waits for idle time: sleep until a block, a wake or close
                    ticks = None  # the next blocks put later start a new window
                    item = self.queue.get()
            except queue.Empty:  # only this thread empties ``later``: blocks still wait
                if self.flush:
                    self._write_later()
                elif ticks is None:
                    ticks = self.idle()  # the first poll with blocks waiting starts the window
                else:
                    idle, ticks = ticks, self.idle()
                    busy = ticks[1] - idle[1]
                    if busy > 0 and ticks[0] - idle[0] >= IDLE_SHARE * busy:
                        self._write_later()
                continue
            if item is _WAKE:
                continue
            batch: list[tuple[str, bytes]] = []
            while item is not None:
                if item is not _WAKE:
                    batch.append(item)
                    if len(batch) >= self.max_batch:
                        break  # blocks come faster than the interval: no put may wait for it
                wait = min(last + SYNC_INTERVAL - time.monotonic(), BURST_GAP)
                try:
                    item = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                last = time.monotonic()
                self._write(batch)
            if item is None:
                while self.later:
                    self._write_later()
                return

    def _write_later(self) -> None:
        """One batch of the blocks put ``later``."""
        with self.lock:
            batch = [self.later.popleft() for _ in range(min(self.max_batch, len(self.later)))]
            self.later_bytes -= sum(len(v) for _, v in batch)
        if batch:
            self.written_later += len(batch)
            self._write(batch, slotted=False)

    def _write(self, batch: list[tuple[str, bytes]], slotted: bool = True) -> None:
        with self.lock:  # in files from here on, which statvfs counts
            self.queued_bytes -= sum(len(v) for _, v in batch)
        try:
            self.cache.put_many(batch)
        except Exception:
            log.exception("cache: writing %d blocks failed", len(batch))
        finally:
            self.done([d for d, _ in batch])
            if slotted:
                for _ in batch:
                    self.slots.release()
            with self.all_written:
                self.unwritten -= len(batch)
                self.all_written.notify_all()
