"""The local copy: the blocks this machine has read, decompressed, at their place in one sparse
file on the cache partition, so that the next boot reads them without the block daemon.

Why: under emulation a read through FUSE costs the daemon ~2 ms of Python and a cached block
another ~5 ms to verify and decompress; the offline second boot of the benchmark (issue 7)
spent 3 s of the daemon's CPU after the switch. With the copy, the root stage maps the copied
blocks straight to the file with device-mapper ``linear`` targets and only the others to the
FUSE file (``table``), so the kernel alone serves what the last boots read.

Trust: the copy is used only under dm-verity, which checks every read of the root against
the signed root hash, whichever file it comes from. A copy altered while the machine was off
fails the altered block's read (dm-verity's I/O error), never serves other bytes; the kernel
reports the block in a uevent, and the daemon takes it out of the map at once and copies it
again from a verified block (``forget``, ``watch_verity_errors``), so later reads and the next
boot are whole. ``seed.copy=off`` boots without the copy.

Files: ``NAME/copy/<index digest>.img`` (sparse, the image's size: holes read as zeros, so
the index's holes map there too) and ``.map``, the copied block numbers (u32 little-endian
each). A block's number is appended only after its bytes are on disk (``fdatasync`` first):
a crash loses at most the last entries, and never maps a block whose bytes are not there.
A new index (another version) starts a new copy and the old one is removed; the new copy
takes over the old one's blocks that the new version has unchanged (same digest at the same
place): the writer carries them over first, disk to disk, and the root stage waits for them,
so even the update's first boot reads them without the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seedboot.agent import layout
from seedboot.agent.dm import Target
from seedboot.agent.errors import FormatError
from seedboot.agent.index import Index, decode

log = logging.getLogger(__name__)

# Copy only while the cache's file system keeps this share free: the copy must not push the
# block cache into eviction (cache.HIGH), which starts at 90% used.
MIN_FREE = 0.30
# Blocks waiting for their write: beyond this a block is skipped, so a slow disk never holds a
# reader or the daemon's memory; the writer copies it later (``backfill``), once it is idle.
MAX_QUEUED = 48
# The writer is idle when no block came for this long: then it copies the skipped ones (a
# sequential read on a host outruns the niced writer; one pass now leaves the whole copy).
BACKFILL_IDLE = 0.5
# Seconds a shutdown waits for the queued blocks (at most MAX_QUEUED) to be written.
FREEZE_WAIT = 10.0
# Blocks written per fdatasync.
BATCH = 16
# O_DIRECT writes need this alignment of offset, length and buffer (the logical block size of
# any disk the cache partition is on; a block of another length is written buffered).
DIRECT_ALIGN = 4096
# The writer's nice value: no reader waits for it, while under emulation the booting machine
# is CPU-bound and every write takes CPU from it.
WRITE_NICE = 10
_ENTRY = struct.Struct("<I")
NETLINK_KOBJECT_UEVENT = 15
SYS_BLOCK = "/sys/block"
MIX_NAME = "seedmix"  # the mixed device the root stage builds (copy + FUSE file)


def _open_direct(img: Path, block_size: int, mode: int = os.O_WRONLY) -> tuple[int | None, mmap.mmap | None]:
    """An O_DIRECT descriptor of a copy (MODE: for writing or reading) and a page-aligned
    buffer of one block (what direct I/O wants), or (None, None) where the file system has no
    direct I/O (tmpfs)."""
    if block_size % DIRECT_ALIGN:
        return None, None
    try:
        fd = os.open(img, mode | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        log.info("local copy %s: no direct I/O (%s); through the page cache", img, e.strerror)
        return None, None
    return fd, mmap.mmap(-1, block_size)


def _read_direct(fd: int, buf: mmap.mmap, n: int, offset: int) -> bytes | None:
    """N bytes at OFFSET of an O_DIRECT descriptor, through BUF (None: a short read). A
    direct read's length must be aligned too: a short last block reads up to the alignment
    (the file's end, if it comes first, ends the read there)."""
    view = memoryview(buf)[: -(-n // DIRECT_ALIGN) * DIRECT_ALIGN]
    try:
        return bytes(view[:n]) if os.preadv(fd, [view], offset) >= n else None
    finally:
        view.release()


def settled_flag(mountpoint: Path) -> Path:
    """Where the block daemon says whether its copy is settled: a file beside the mount point,
    not in it ("0" while the boot profile or the carried blocks are being copied, "1" once they
    are). The root stage checks it every SETTLED_POLL s: a read of ``progress.json`` is
    several FUSE requests the daemon answers in Python, and the stage read it every 0.2 s
    (~170 requests by a first boot's switch; under -icount the daemon's CPU then fell by
    0.07 s, and the stage notices the end within 0.05 s instead of 0.2 s)."""
    return mountpoint.with_name(mountpoint.name + ".copy")


SETTLED_POLL = 0.05
# The daemon stops watching a copy that made no progress this long: longer than the root stage
# waits without progress (PROFILE_STALL), so no waiting stage misses the flag, and a copy that
# never settles does not wake the daemon 20 times a second for the rest of its life.
SETTLED_GIVE_UP = 30.0


def carry_left(copy: dict[str, Any]) -> int:
    """Blocks the copy (its ``status()``) still has to carry over: none while it is paused
    (its file system too full), for a paused copy carries nothing more."""
    return int(copy.get("carry") or 0) if copy.get("room", True) else 0


def progress_mark(progress: dict[str, Any]) -> tuple[object, object]:
    """What changes while the profile and the copy move on (blocks prefetched, written): the
    root stage and the daemon's watch both call a copy stalled when it stays the same."""
    return ((progress.get("prefetch") or {}).get("done"), (progress.get("copy") or {}).get("written"))


def copying_profile(progress: dict[str, Any]) -> bool:
    """From ``progress.json``: the prefetch is a boot profile's, which goes into the copy."""
    pf = progress.get("prefetch") or {}
    return pf.get("what") == "profile" and bool(pf.get("total"))


def settled(progress: dict[str, Any]) -> bool:
    """From ``progress.json``: nothing more for the root stage to wait for (no copy, or it
    stopped, or neither a boot profile nor carried blocks to copy, or all of them copied)."""
    pf, cp = progress.get("prefetch") or {}, progress.get("copy") or {}
    if not cp or cp.get("stopped"):
        return True
    profile = copying_profile(progress)
    carry = carry_left(cp)
    if not profile and not carry and not cp.get("carried"):
        return True
    return (not profile or bool(pf.get("complete"))) and not cp.get("queued") and not carry


def paths(cache: Path, name: str, index_digest: str) -> tuple[Path, Path]:
    base = cache / name / "copy" / index_digest
    return base.with_suffix(".img"), base.with_suffix(".map")


def read_map(map_path: Path, nblocks: int) -> set[int]:
    """The copied blocks: a torn last entry and numbers past the image are ignored."""
    try:
        data = map_path.read_bytes()
    except FileNotFoundError:
        return set()
    n = len(data) // _ENTRY.size
    return {b for (b,) in _ENTRY.iter_unpack(data[: n * _ENTRY.size]) if b < nblocks}


def local_flags(index: Index, copied: set[int]) -> bytearray:
    """One byte per block: 1 where it comes from the copy (copied, or a hole: zeros in the
    sparse file), 0 where from the FUSE file."""
    flags = bytearray(map((0).__eq__, index.lengths))  # a hole's stored length is 0
    for b in copied:
        flags[b] = 1
    return flags


def runs(flags: bytearray) -> list[tuple[int, int, bool]]:
    """Runs of equal flags as (first, count, from_copy); scanned with bytes.find, so the
    Python work is per run, not per block (PID 1 builds the table under emulation)."""
    out: list[tuple[int, int, bool]] = []
    pos, n = 0, len(flags)
    while pos < n:
        local = flags[pos] == 1
        end = flags.find(b"\0" if local else b"\1", pos)
        end = n if end < 0 else end
        out.append((pos, end - pos, local))
        pos = end
    return out


def segments(index: Index, copied: set[int]) -> list[tuple[int, int, bool]]:
    """Runs of blocks as (first, count, from_copy): a block comes from the copy when it was
    copied or is a hole, otherwise from the FUSE file."""
    return runs(local_flags(index, copied))


def table(index: Index, copied: set[int], fuse_dev: str, copy_dev: str) -> list[Target]:
    """The device-mapper table of the mixed device: ``linear`` targets, each block at its own
    offset on the copy or on the FUSE file's loop device."""
    spb = index.block_size // 512
    total = index.image_size // 512
    targets: list[Target] = []
    for first, count, local in segments(index, copied):
        start = first * spb
        length = min(count * spb, total - start)
        if length > 0:
            targets.append((start, length, "linear", f"{copy_dev if local else fuse_dev} {start}"))
    return targets


def usable(img: Path, map_path: Path, index: Index) -> set[int]:
    """The copied blocks of a copy that fits this index (empty if none or if it is short)."""
    try:
        if img.stat().st_size < index.image_size:
            return set()
    except FileNotFoundError:
        return set()
    return read_map(map_path, index.nblocks)


class LocalCopy:
    """The daemon's writer: ``add(b, plain)`` from the read path, written by one thread."""

    def __init__(
        self,
        cache: Path,
        name: str,
        index: Index,
        index_digest: str,
        reserved: Callable[[], int] = lambda: 0,
        backfill: Callable[[int], bytes] | None = None,
    ) -> None:
        self.index = index
        # a skipped block's verified plain bytes, from the daemon's memory or cache (raises
        # OSError when it cannot): the writer copies skipped blocks with it when idle
        self.backfill = backfill
        self.missed: set[int] = set()
        self.backfilled = 0
        # bytes the block cache is about to write to the same file system (blocks batched
        # for their sync): the copy leaves room for them too
        self.reserved = reserved
        self.img, self.map = paths(cache, name, index_digest)
        self.img.parent.mkdir(parents=True, exist_ok=True)
        # another version's copy: its blocks this version has unchanged, carried over by the
        # writer before anything but queued blocks (read from this descriptor: its files are
        # removed below); the prefetch leaves them to it (``will_have``)
        self.carry: list[int] = []  # not read yet, highest first: pop() takes the lowest
        self.carry_set: set[int] = set()  # not written yet (those being written included)
        self.carry_fd: int | None = None
        self.carry_buf: mmap.mmap | None = None  # set: carry_fd is O_DIRECT
        self.carried = 0
        self._take_over(cache, name, index_digest)
        for old in self.img.parent.iterdir():
            if old.stem != index_digest:
                log.info("local copy: removing %s (another version's)", old.name)
                with contextlib.suppress(OSError):
                    old.unlink()
        self.fd = os.open(self.img, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self.fd).st_size < index.image_size:
            os.ftruncate(self.fd, index.image_size)
        self.direct_fd, self.direct_buf = _open_direct(self.img, index.block_size)
        self.map_fd = os.open(self.map, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.have = read_map(self.map, index.nblocks)
        self.queued: set[int] = set()
        self.queue: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.drained = threading.Condition(self.lock)  # queued blocks were written
        self.stopped = ""
        self.closed = False
        self.room = True
        self.written = 0
        self.forgotten = 0
        self.thread = threading.Thread(target=self._run, name="local-copy", daemon=True)
        self.thread.start()
        log.info("local copy %s: %d of %d blocks copied before", self.img, len(self.have), index.nblocks)

    def _take_over(self, cache: Path, name: str, index_digest: str) -> None:
        """Open another version's copy and note which of its blocks are the same here (same
        digest at the same place), so that an update does not start the copy from nothing.
        They are checked like every copied block: by dm-verity against this version's root
        hash when read (a block altered on the disk fails that read and is copied again)."""
        index = self.index
        for old in sorted(self.img.parent.glob("*.img")):
            if old.stem == index_digest or self.carry_fd is not None:
                continue
            try:
                data = (cache / layout.index_path(name, old.stem)).read_bytes()
                if hashlib.sha256(data).hexdigest() != old.stem:
                    raise FormatError("its index in the cache does not match its name")
                prev = decode(data)
                if prev.block_size != index.block_size:
                    raise FormatError(f"its blocks are {prev.block_size} bytes, these {index.block_size}")
                same = [
                    b
                    for b in read_map(old.with_suffix(".map"), min(prev.nblocks, index.nblocks))
                    if not index.is_hole(b)
                    and prev.digests[b] == index.digests[b]
                    and prev.plain_len(b) == index.plain_len(b)
                ]
                if same:
                    self.carry_fd = self._open_old(old)
            except (OSError, FormatError) as e:
                log.info("local copy: %s not taken over: %s", old.name, e)
                continue
            if same:
                self.carry = sorted(same, reverse=True)
                self.carry_set = set(same)
                log.info("local copy: taking over %d unchanged blocks from %s", len(same), old.name)

    def _open_old(self, old: Path) -> int:
        """The other version's copy, read with O_DIRECT where its blocks allow (``carry_buf``):
        through the page cache, under emulation each 4 KiB page of it cost the kernel a page
        to fill and later to reclaim, for bytes read once."""
        fd, self.carry_buf = _open_direct(old, self.index.block_size, os.O_RDONLY)
        return os.open(old, os.O_RDONLY | os.O_CLOEXEC) if fd is None else fd

    def will_have(self, b: int) -> bool:
        """Whether block b is in the copy or about to be carried into it."""
        return b in self.have or b in self.carry_set

    def add(self, b: int, plain: bytes, wait: bool = False) -> bool:
        """Queue block b's verified plain bytes for the copy (cheap when it is there). With
        MAX_QUEUED blocks waiting it is skipped (a reader never waits for the disk), unless
        ``wait``: the profile's prefetch waits for room instead."""
        if self.will_have(b) or b in self.queued or self.stopped or self.closed or self.index.is_hole(b):
            return False
        with self.drained:
            while len(self.queued) >= MAX_QUEUED:
                if not wait or self.stopped:
                    if not self.stopped:
                        self.missed.add(b)
                    return False
                self.drained.wait(0.5)
            if b in self.queued:
                return False
            self.queued.add(b)
        self.queue.put((b, plain))
        return True

    def freeze(self, why: str) -> None:
        """No more writes (the machine shuts down): what is queued is written, the files closed."""
        self.close(timeout=FREEZE_WAIT)
        self.stopped = why

    def close(self, timeout: float = 30) -> None:
        with self.lock:
            self.closed = True
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            # its files stay open: closing them under a write could hand their numbers to others
            log.warning("local copy %s: the writer did not finish within %.0f s", self.img, timeout)
            return
        with self.lock:  # not while forget() swaps the map file
            for fd in (self.fd, self.map_fd, self.direct_fd, self.carry_fd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def status(self) -> dict[str, object]:
        return {
            "path": str(self.img),
            "blocks": len(self.have),
            "queued": len(self.queued),
            "written": self.written,
            "dropped": self.forgotten,
            "stopped": self.stopped,
            "room": self.room,
            "missed": len(self.missed),
            "backfilled": self.backfilled,
            "carried": self.carried,
            "carry": len(self.carry_set),
        }

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # a thread's nice value is its own on Linux
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITE_NICE)
        while True:
            try:
                if self.carry and self.room:
                    # the root stage waits for the carried blocks: no idle wait before them
                    item = self.queue.get_nowait()
                else:
                    idle = BACKFILL_IDLE if self.room and self.missed and self.backfill else None
                    item = self.queue.get(timeout=idle)
            except queue.Empty:
                carry = bool(self.carry)
                late = self._carry_batch() if carry else self._missed_batch()
                if late:
                    before = self.written
                    self._write_batch(late)
                    if carry:
                        self.carried += self.written - before
                        self.carry_set.difference_update(b for b, _ in late)
                    else:
                        self.backfilled += self.written - before
                if self.stopped:
                    return
                continue
            if item is None:
                return
            batch = [item]
            while len(batch) < BATCH:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                self._write_batch(batch)
            finally:
                with self.drained:
                    self.queued.difference_update(b for b, _ in batch)
                    self.drained.notify_all()
            if self.stopped:
                return

    def _missed_batch(self) -> list[tuple[int, bytes]]:
        """Up to BATCH skipped blocks with their bytes (a block that cannot be had is let go:
        it is copied when read again)."""
        assert self.backfill is not None
        batch: list[tuple[int, bytes]] = []
        while self.missed and len(batch) < BATCH and not (self.stopped or self.closed):
            b = min(self.missed)
            self.missed.discard(b)
            if b in self.have:
                continue
            try:
                batch.append((b, self.backfill(b)))
            except OSError as e:
                log.debug("local copy: skipped block %d not copied: %s", b, e)
        return batch

    def _carry_batch(self) -> list[tuple[int, bytes]]:
        """Up to BATCH blocks from the other version's copy (``_take_over``); its descriptor is
        closed once they are all taken or it cannot be read."""
        batch: list[tuple[int, bytes]] = []
        fd = self.carry_fd
        while fd is not None and self.carry and len(batch) < BATCH and not (self.stopped or self.closed):
            b = self.carry.pop()
            if b in self.have:
                self.carry_set.discard(b)
                continue
            n = self.index.plain_len(b)
            off = b * self.index.block_size
            try:
                buf = self.carry_buf
                data = _read_direct(fd, buf, n, off) if buf is not None else os.pread(fd, n, off)
            except OSError as e:
                log.warning("local copy: taking over stopped: %s", e.strerror)
                self.carry = []
                break
            if data is not None and len(data) == n:
                batch.append((b, data))
            else:
                self.carry_set.discard(b)
        if fd is not None and (not self.carry or self.closed):
            os.close(fd)
            self.carry_fd, self.carry = None, []
            self.carry_set = {b for b, _ in batch}
        return batch

    def _write_batch(self, batch: list[tuple[int, bytes]]) -> None:
        try:
            if self._room(batch):
                self._write(batch)
        except OSError as e:
            self.stopped = f"{e.strerror or e}"
            log.warning("local copy %s: stopped: %s", self.img, self.stopped)

    def _room(self, batch: list[tuple[int, bytes]]) -> bool:
        """Whether the batch leaves MIN_FREE of the file system free; if not it is skipped
        (its blocks are copied when read again, once eviction or the user made room)."""
        st = os.fstatvfs(self.fd)
        need = sum(len(p) for _, p in batch) + self.reserved()
        room = st.f_bavail * st.f_frsize - need >= MIN_FREE * st.f_blocks * st.f_frsize
        if room != self.room:
            self.room = room
            log.info("local copy %s: %s", self.img, "room again" if room else f"paused: the cache file "
                     f"system would have less than {MIN_FREE:.0%} free")  # fmt: skip
        return room

    def _write(self, batch: list[tuple[int, bytes]]) -> None:
        bs = self.index.block_size
        buffered = [(b, plain) for b, plain in batch if not self._write_direct(plain, b * bs)]
        for b, plain in buffered:
            os.pwrite(self.fd, plain, b * bs)
        os.fdatasync(self.fd)  # the bytes first: a mapped block must be on disk
        for b, plain in buffered:  # and out of the page cache: the next boot reads them, not this one
            os.posix_fadvise(self.fd, b * bs, len(plain), os.POSIX_FADV_DONTNEED)
        with self.lock:  # not while forget() swaps the map file
            os.write(self.map_fd, b"".join(_ENTRY.pack(b) for b, _ in batch))
            self.have.update(b for b, _ in batch)
        self.written += len(batch)

    def _write_direct(self, plain: bytes, offset: int) -> bool:
        """Write with O_DIRECT if the block and the file system allow it; False: write it
        buffered. A buffered write costs the kernel a page-cache page, a writeback and a
        completion per 4 KiB, a direct one hands the disk the block in one request: under
        emulation the writer used 0.44 s of CPU for a first boot's profile (46 MB) buffered and
        0.16 s direct (-icount)."""
        n = len(plain)
        buf = self.direct_buf
        if self.direct_fd is None or buf is None or n % DIRECT_ALIGN or n > len(buf):
            return False
        buf[:n] = plain
        try:
            os.pwrite(self.direct_fd, memoryview(buf)[:n], offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.info("local copy %s: direct I/O refused (%s); writing through the page cache", self.img, e)
            os.close(self.direct_fd)
            self.direct_fd = None
            return False
        return True

    def forget(self, b: int, why: str) -> bool:
        """Take block b out of the map (a new map file, swapped in atomically), so no later
        boot maps it; True if it was there. Its next read goes through the daemon and copies
        it again: over the bad bytes, which mends this boot's later reads of it too."""
        with self.lock:
            if b not in self.have or self.closed:
                return False
            self.have.discard(b)
            tmp = self.map.with_name(self.map.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"".join(_ENTRY.pack(x) for x in sorted(self.have)))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.map)
            os.close(self.map_fd)
            self.map_fd = os.open(self.map, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.forgotten += 1
        log.warning("local copy %s: block %d dropped: %s", self.img, b, why)
        return True


VERITY_DATA, VERITY_METADATA = 0, 1  # the kinds in DM_VERITY_ERR_BLOCK_NR (enum verity_block_type)


def watch_verity_errors(dm_name: str, on_error: Callable[[int, int], None]) -> bool:
    """Call ``on_error(KIND, N)`` from a thread whenever dm-verity on device ``dm_name``
    reports block N corrupt: the kernel sends a uevent with DM_VERITY_ERR_BLOCK_NR=KIND,N
    (drivers/md/dm-verity-target.c, verity_handle_err) as it fails the read; KIND is
    VERITY_DATA for a data block, VERITY_METADATA for a block of the hash tree. False if the
    uevent socket cannot be opened."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        sock.bind((0, 1))  # group 1: the kernel's own uevents
    except OSError as e:
        log.warning("local copy: no uevent socket (%s): dm-verity errors will not mend the copy", e)
        return False

    def run() -> None:
        while True:
            try:
                msg = sock.recv(16384)
            except OSError:
                return
            if b"DM_VERITY_ERR_BLOCK_NR=" not in msg:  # every other uevent of the boot: cheap
                continue
            fields = dict(f.partition(b"=")[::2] for f in msg.split(b"\0") if b"=" in f)
            err, dev = fields.get(b"DM_VERITY_ERR_BLOCK_NR"), fields.get(b"DEVNAME", b"").decode()
            if err is None or not dev:
                continue
            kind, _, block = err.decode().partition(",")
            try:
                with open(f"{SYS_BLOCK}/{os.path.basename(dev)}/dm/name") as f:
                    name = f.read().strip()
            except OSError:
                continue
            if name == dm_name and kind.isdigit() and block.isdigit():
                on_error(int(kind), int(block))

    threading.Thread(target=run, name="verity-errors", daemon=True).start()
    return True
