"""The FUSE side (pyfuse3 on asyncio): a read-only ``disk.img``, a virtual ``status.json`` and
``progress.json`` (the prefetch and local copy counters alone: cheap to render, for polling).

Reads never block the event loop: a block not in memory is requested from the block device
(an I/O or fetcher thread delivers it) and the read task waits on an asyncio event, so many
reads are in flight at once. ``status.json`` is rendered when opened, so ``seedboot status``
needs nothing but the mount point.

Why asyncio and not trio: ``seedboot.agent.pyfuse``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import stat
from collections.abc import Callable
from typing import Any

from seedboot.agent.blockdev import BlockDevice, ReadAhead, Recorder
from seedboot.agent.fetcher import DEMAND
from seedboot.agent.localcopy import LocalCopy
from seedboot.agent.pyfuse import pyfuse3

log = logging.getLogger(__name__)

DISK = pyfuse3.ROOT_INODE + 1
STATUS = pyfuse3.ROOT_INODE + 2
PROGRESS = pyfuse3.ROOT_INODE + 3
NAMES = {b"disk.img": DISK, b"status.json": STATUS, b"progress.json": PROGRESS}
STATUS_FH_BASE = 1000


class _Wait:
    """One block a read waits for: set by whichever thread delivers it."""

    __slots__ = ("error", "event", "plain")

    def __init__(self) -> None:
        self.plain: bytes | None = None
        self.error = ""
        self.event = asyncio.Event()


class SeedFS(pyfuse3.Operations):
    def __init__(
        self,
        dev: BlockDevice,
        status: Callable[[], bytes],
        mtime_ns: int,
        readahead: ReadAhead | None = None,
        recorder: Recorder | None = None,
        copy: LocalCopy | None = None,
        progress: Callable[[], bytes] = lambda: b"{}\n",
    ) -> None:
        super().__init__()
        self.dev = dev
        self.status = status
        self.progress = progress
        self.mtime_ns = mtime_ns
        self.readahead = readahead
        self.recorder = recorder
        self.copy = copy
        self.size = dev.index.image_size
        self.bs = dev.index.block_size
        self.status_files: dict[int, bytes] = {}
        self.next_fh = STATUS_FH_BASE
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the daemon once it runs
        self.reply = bytearray()

    def _attr(self, inode: int) -> Any:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid = 0
        a.st_gid = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        a.st_blksize = self.bs
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
            a.st_size = 0
        elif inode == DISK:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = self.size
            a.attr_timeout = a.entry_timeout = 3600
        elif inode in (STATUS, PROGRESS):
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = 0  # rendered on open; read with direct I/O
            a.attr_timeout = a.entry_timeout = 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_blocks = (a.st_size + 511) // 512
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != pyfuse3.ROOT_INODE or name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(NAMES[name])

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = sorted(NAMES.items())
        for i, (name, inode) in enumerate(entries):
            if i < start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), i + 1):
                break

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if flags & (0o3):  # O_WRONLY or O_RDWR
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode == DISK:
            return pyfuse3.FileInfo(fh=DISK, keep_cache=True)
        if inode in (STATUS, PROGRESS):
            fh = self.next_fh
            self.next_fh += 1
            self.status_files[fh] = self.status() if inode == STATUS else self.progress()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        raise pyfuse3.FUSEError(errno.EISDIR)

    async def release(self, fh: int) -> None:
        self.status_files.pop(fh, None)

    async def statfs(self, ctx: Any) -> Any:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.size // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = 2
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        if fh != DISK:
            data = self.status_files.get(fh, b"")
            return data[off : off + size]
        if off >= self.size or size <= 0:
            return b""
        end = min(off + size, self.size)
        first, last = off // self.bs, (end - 1) // self.bs
        self.dev.counters.reads += 1
        self.dev.counters.read_bytes += end - off
        if self.recorder is not None:
            self.recorder.note(first, last)
        # ask for what this read needs first, then for read-ahead, then wait
        if first == last:
            w = self._request(first)
            if self.readahead is not None:
                self.readahead.note(first, last)
            plain = w.plain if w.plain is not None else await self._wait(first, w)
            if self.copy is not None:
                self.copy.add(first, plain)
            base = first * self.bs
            # pyfuse3 takes any buffer: a view saves copying (and faulting in) every reply
            return memoryview(plain)[off - base : end - base]
        waits = [self._request(b) for b in range(first, last + 1)]
        if self.readahead is not None:
            self.readahead.note(first, last)
        # all are requested already: waiting in order costs no parallelism
        plains = [
            w.plain if w.plain is not None else await self._wait(b, w)
            for b, w in zip(range(first, last + 1), waits, strict=True)
        ]
        # pyfuse3 replies from one buffer: the slices asked for go into one reused buffer
        # (a fresh 1 MiB per read costs page faults and heap churn). No await from here on,
        # and pyfuse3 copies the reply to the kernel as soon as this returns, before any
        # other read runs: nothing can overwrite the buffer in between.
        n = end - off
        if len(self.reply) < n:
            self.reply = bytearray(n)
        view = memoryview(self.reply)
        pos = 0
        for b, plain in zip(range(first, last + 1), plains, strict=True):
            if self.copy is not None:
                self.copy.add(b, plain)
            base = b * self.bs
            lo, hi = max(off - base, 0), min(end - base, len(plain))
            view[pos : pos + hi - lo] = memoryview(plain)[lo:hi]
            pos += hi - lo
        return view[:n]

    def _request(self, b: int) -> _Wait:
        w = _Wait()

        loop = self.loop
        assert loop is not None, "reads come only once the daemon's loop runs"

        def done(p: bytes | None, error: str) -> None:
            w.plain, w.error = p, error
            loop.call_soon_threadsafe(w.event.set)

        plain = self.dev.lookup(b, DEMAND, done)
        if plain is not None:  # else done() sets it, perhaps already (another thread)
            w.plain = plain
        return w

    async def _wait(self, b: int, w: _Wait) -> bytes:
        await w.event.wait()
        if w.plain is None:
            log.error("read of block %d failed: %s", b, w.error)
            raise pyfuse3.FUSEError(errno.EIO)
        return w.plain
