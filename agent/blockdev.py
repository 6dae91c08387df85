"""The block device: image blocks from memory, the cache or the mirrors, always verified.

``BlockDevice.request(b, prio, done)`` delivers the plain bytes of block ``b`` to
``done(plain, error)`` from some thread, once. In order:

1. a hole is zeros;
2. a block in the small in-memory LRU of plain blocks is served at once;
3. a block someone already asked for joins that request (one fetch per digest);
4. a cached block is read on an I/O thread, verified the first time this mount reads it
   (a bad file is dropped and fetched again), decompressed;
5. anything else goes to the fetcher; when it arrives verified, it is handed to the reader
   and written to the cache by a writer thread.

With no fetcher (``--offline``) step 5 fails the read and logs which block and why.

Also here: sequential read-ahead (``ReadAhead``), profile/all prefetch (``Prefetcher``),
first-read trace (``Recorder``) and the status snapshot.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seedboot.agent import profile as profilemod
from seedboot.agent.atomic import write_atomic
from seedboot.agent.blocks import decompress, verify
from seedboot.agent.cache import BatchWriter, BlockCache
from seedboot.agent.errors import BlockInvalid
from seedboot.agent.fetcher import DEMAND, PREFETCH, READAHEAD, Fetcher, Job
from seedboot.agent.index import Index
from seedboot.agent.localcopy import LocalCopy
from seedboot.agent.mirrors import MirrorSet

log = logging.getLogger(__name__)

# done(plain, error): error is "" on success; plain is None on failure, and also for a
# request that asked not to keep the block (keep=False: it only has to reach the cache)
Deliver = Callable[[bytes | None, str], None]

# Fetched blocks waiting for their cache write (cache.BatchWriter), beyond which verification
# (and so fetching) waits, once it has delivered the block it holds; a batch is written at
# half of these. The bound is in bytes of block size, between MIN and MAX_PENDING_WRITES
# blocks. Measured on the host (cold read, 100 ms, peak resident memory; 0 ms MB/s): 64 ->
# 65.9 MB, 262 MB/s; 32 -> 64.0 MB; 24 -> 61.1 MB, 279 MB/s. Under emulation a boot's
# profile (~90 blocks/s) took 2.5 s with 24 and 2.2-2.5 s with 64: within run-to-run noise.
PENDING_WRITE_BYTES = 6 << 20
MIN_PENDING_WRITES = 8
MAX_PENDING_WRITES = 24

# Decompressed blocks kept in memory for re-reads (a block is read in pieces, minutes apart:
# keeping 12 meant 313 decompressions for the 254 blocks of a Debian boot, 48 mean 214), as
# long as the daemon's resident memory stays under MEMORY_BUDGET: a cold burst of transfers
# and cache writes takes memory too, and then fewer blocks are kept (``fit_memory``). The
# budget leaves room for a burst between two trims (twice a second): a cold sequential read at
# 100 ms with 128 transfers in flight peaked at 65 MB resident with a budget of 52 MiB (39
# blocks kept), at 59 MB with 46 (the target: 64).
MEMORY_BLOCKS = 48
MIN_MEMORY_BLOCKS = 8
MEMORY_BUDGET = 46 * 1024 * 1024
# Blocks waiting in memory for their cache write (``defer_write``) stop at this resident size:
# above the budget (kept blocks give way to them, and are decompressed again if read again) but
# under the daemon's 64 MB target. Measured: a boot profile's 169 blocks waiting took the daemon
# from ~31 to 50 MB, and the boot reached its marker ~0.5 s earlier under -icount.
DEFER_RSS = 56 * 1024 * 1024
# Prefetch transfers in flight while each block also goes to the local copy (Prefetcher)
COPY_DEPTH = 16


@dataclass
class Counters:
    reads: int = 0
    read_bytes: int = 0
    from_memory: int = 0
    from_cache: int = 0
    fetched: int = 0
    readahead: int = 0
    prefetched: int = 0
    fetched_bytes: int = 0
    errors: int = 0
    cache_dropped: int = 0


class Workers:
    """Up to ``n`` threads running queued calls in order, started as work comes. Per call it
    costs a queue put and get: a ThreadPoolExecutor adds a Future (a condition variable
    and its lock) and a semaphore check per call, paid on every block read."""

    def __init__(self, n: int, name: str) -> None:
        self.n = n
        self.name = name
        self.queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self.threads: list[threading.Thread] = []
        self.idle = 0
        self.lock = threading.Lock()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.queue.put((fn, args))
        if self.idle == 0 and len(self.threads) < self.n:  # checked again under the lock
            with self.lock:
                if self.idle == 0 and len(self.threads) < self.n:
                    name = f"{self.name}_{len(self.threads)}"
                    t = threading.Thread(target=self._run, name=name, daemon=True)
                    self.threads.append(t)
                    t.start()

    def _run(self) -> None:
        while True:
            with self.lock:
                self.idle += 1
            item = self.queue.get()
            with self.lock:
                self.idle -= 1
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("%s: %s failed", self.name, getattr(fn, "__name__", fn))

    def close(self, cancel: bool = False) -> None:
        if cancel:
            try:
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()


@dataclass
class _Pending:
    b: int
    callbacks: list[Deliver]
    prio: int
    keep: bool
    job: Job | None = None


@dataclass
class Throughput:
    """Bytes fetched over a sliding window, and since the start."""

    window: float = 5.0
    t0: float = field(default_factory=time.monotonic)
    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    total: int = 0

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.total += n
        self.samples.append((now, n))
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()

    def current(self) -> float:
        now = time.monotonic()
        recent = sum(n for t, n in self.samples if t >= now - self.window)
        return recent / self.window

    def average(self) -> float:
        return self.total / max(time.monotonic() - self.t0, 1e-3)


class BlockDevice:
    def __init__(
        self,
        index: Index,
        cache: BlockCache,
        fetcher: Fetcher | None,
        memory_blocks: int = MEMORY_BLOCKS,
        io_threads: int = 4,
    ) -> None:
        self.index = index
        self.cache = cache
        self.fetcher = fetcher
        self.lock = threading.Lock()
        self.plain: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.memory_blocks = memory_blocks
        self.memory_limit = min(memory_blocks, MIN_MEMORY_BLOCKS)  # grows while memory allows
        self.pending: dict[str, _Pending] = {}
        self.verified: set[str] = set()
        # stored bytes on their way to the cache: a read in the meantime takes them from here
        self.writing: dict[str, bytes] = {}
        self.counters = Counters()
        self.throughput = Throughput()
        # reads someone waits for never queue behind read-ahead: separate pools. Four threads
        # each: a cached block is a file open and read (disk latency, no GIL held) before its
        # verify and decompress, and two threads left the CPU idle waiting on the disk
        self.io_pool = Workers(io_threads, "cache-read")
        self.ahead_pool = Workers(io_threads, "cache-ahead")
        slots = max(MIN_PENDING_WRITES, min(MAX_PENDING_WRITES, PENDING_WRITE_BYTES // index.block_size))
        self.writer = BatchWriter(cache, slots, self._written)
        # the profile's prefetch fills the local copy too: the next boot maps those blocks from
        # there, so their cache writes wait until the machine idles (cache.BatchWriter ``later``),
        # as long as memory allows (``defer_write``)
        self.defer_prefetched = False
        self.rss = 0  # the last resident size fit_memory heard
        self.defer_rss = DEFER_RSS
        self.deferred_since = 0  # bytes deferred since that reading
        self.zero = bytes(index.block_size)
        self.started = time.monotonic()
        cache.pinned = self._pinned

    def close(self) -> None:
        self.io_pool.close(cancel=True)
        self.ahead_pool.close(cancel=True)
        self.writer.close()

    def _pinned(self, digest: str) -> bool:
        with self.lock:
            return digest in self.pending or digest in self.writing

    # -- lookups -------------------------------------------------------------------------

    def is_local(self, b: int) -> bool:
        """True if block b needs no network: a hole, in memory, or in the cache."""
        if self.index.is_hole(b):
            return True
        d = self.index.digest_hex(b)
        with self.lock:
            if d in self.plain:
                return True
        return self.cache.has(d)

    def ahead(self, b: int) -> None:
        """Make block b local (fetch it into the cache) without holding it in memory."""
        if self.fetcher is None or self.is_local(b):
            return
        d = self.index.digest_hex(b)
        with self.lock:
            if d in self.pending or d in self.writing:
                return
        self.request(b, READAHEAD, _ignore, keep=False)

    def request(self, b: int, prio: int, done: Deliver, keep: bool = True) -> None:
        plain = self.lookup(b, prio, done, keep)
        if plain is not None:
            done(plain, "")

    def lookup(self, b: int, prio: int, done: Deliver, keep: bool = True) -> bytes | None:
        """The plain bytes of b if they are at hand (a hole, or in memory); otherwise None,
        and ``done`` gets them later. One lock round for the read's whole decision."""
        if self.index.is_hole(b):
            return self.zero[: self.index.plain_len(b)]
        d = self.index.digest_hex(b)
        with self.lock:
            plain = self.plain.get(d)
            if plain is not None:
                self.plain.move_to_end(d)
                self.counters.from_memory += 1
                return plain
            p = self.pending.get(d)
            if p is not None:
                p.callbacks.append(done)
                p.keep = p.keep or keep
                if keep and p.job is not None:
                    p.job.plain = True
                if prio < p.prio:
                    p.prio = prio
                    if p.job is not None and self.fetcher is not None:
                        self.fetcher.raise_priority(p.job, prio)
                return None
            self.pending[d] = _Pending(b, [done], prio, keep)
            writing = d in self.writing
        if writing or self.cache.has(d):
            (self.io_pool if prio == DEMAND else self.ahead_pool).submit(self._load, b, d)
        else:
            self._fetch(b, d)
        return None

    def _load(self, b: int, d: str) -> None:
        with self.lock:
            stored = self.writing.get(d)
        if stored is None:
            stored = self.cache.read(d)
        if stored is None:
            self._fetch(b, d)
            return
        what = f"block {b}"
        try:
            if d in self.verified:
                plain = decompress(stored, d, self.index.plain_len(b), what)
            else:
                plain = verify(stored, d, self.index.lengths[b], self.index.plain_len(b), what)
                self.verified.add(d)
                self.cache.touch(d)
        except BlockInvalid as e:
            self.counters.cache_dropped += 1
            self.verified.discard(d)
            self.cache.drop(d, f"cached copy of {what} is bad: {e.message}")
            self._fetch(b, d)
            return
        with self.lock:
            self.counters.from_cache += 1
        self._deliver(d, plain, "")

    def _fetch(self, b: int, d: str) -> None:
        if self.fetcher is None:
            # the reader logs the failure (read-ahead and prefetch just stop here)
            self._deliver(d, None, f"block {b} ({d[:16]}) is not in the cache and --offline is set")
            return
        with self.lock:
            prio = self.pending[d].prio

        def fetched(plain: bytes | None, stored: bytes | None, error: str) -> None:
            if stored is None:
                self._deliver(d, None, f"block {b} ({d[:16]}): {error}")
                return
            with self.lock:
                p = self.pending.get(d)
                want = p is not None and p.keep
            if plain is None and want:
                # a reader joined after the fetch was asked for the cache only
                try:
                    plain = verify(stored, d, self.index.lengths[b], self.index.plain_len(b), f"block {b}")
                except BlockInvalid as e:
                    # the digest matched, so the published block itself is bad: no mirror can help
                    self._deliver(d, None, f"block {b} ({d[:16]}): {e.message}")
                    return
            if plain is not None:
                self.verified.add(d)
            with self.lock:
                kind = p.prio if p else PREFETCH
                if kind == DEMAND:
                    self.counters.fetched += 1
                elif kind == READAHEAD:
                    self.counters.readahead += 1
                else:
                    self.counters.prefetched += 1
                self.counters.fetched_bytes += len(stored)
                self.throughput.add(len(stored))
            with self.lock:
                self.writing[d] = stored
            # the reader has its block before this thread waits for a write slot: only
            # fetching (this verify thread) waits for the disk's fsyncs, not reads
            self._deliver(d, plain, "")
            self.writer.put(d, stored, later=kind == PREFETCH and self.defer_write(len(stored)))

        with self.lock:
            keep = self.pending[d].keep
        job = self.fetcher.submit(
            d, self.index.lengths[b], self.index.plain_len(b), f"block {b}", prio, fetched, plain=keep
        )
        with self.lock:
            p = self.pending.get(d)
            if p is not None:
                p.job = job
                job.plain = job.plain or p.keep

    def defer_write(self, n: int) -> bool:
        """Whether a prefetched block of N stored bytes may wait in memory for its cache write:
        only the profile's (see ``defer_prefetched``), and only while the resident size, with
        what waits since it was last measured, stays within DEFER_RSS."""
        with self.lock:
            if not self.defer_prefetched or self.rss + self.deferred_since + n > self.defer_rss:
                return False
            self.deferred_since += n
            return True

    def fit_memory(self, rss: int, budget: int = MEMORY_BUDGET) -> None:
        """Given the daemon's resident bytes (twice a second): over the budget, drop as many
        kept blocks as it is over; under it, allow more, up to memory_blocks."""
        bs = self.index.block_size
        with self.lock:
            self.rss, self.deferred_since = rss, 0
            if rss > budget:
                over = -(-(rss - budget) // bs)
                self.memory_limit = max(MIN_MEMORY_BLOCKS, min(self.memory_limit, len(self.plain)) - over)
                while len(self.plain) > self.memory_limit:
                    self.plain.popitem(last=False)
            else:  # half the headroom: what else grows (transfers, writes) may take the rest
                room = len(self.plain) + (budget - rss) // bs // 2
                self.memory_limit = min(self.memory_blocks, max(self.memory_limit, room))

    def writing_bytes(self) -> int:
        """Bytes of fetched blocks queued for the cache, not yet in its files."""
        return self.writer.queued_bytes

    def _written(self, digests: list[str]) -> None:
        with self.lock:
            for d in digests:
                self.writing.pop(d, None)

    def _deliver(self, d: str, plain: bytes | None, error: str) -> None:
        with self.lock:
            p = self.pending.pop(d, None)
            if p is None:
                return
            if plain is None and not error and p.keep:
                # a reader joined just after a cache-only fetch was verified without
                # decompressing: its bytes are in ``writing`` or the cache, load them from there
                p.job = None
                self.pending[d] = p
                self.io_pool.submit(self._load, p.b, d)
                return
            if plain is not None and p.keep:
                self.plain[d] = plain
                while len(self.plain) > self.memory_limit:
                    self.plain.popitem(last=False)
            if error:
                self.counters.errors += 1
        for cb in p.callbacks:
            try:
                cb(plain, error)
            except Exception:
                log.exception("delivering block %s", d[:16])

    def wait_block(
        self, b: int, prio: int = DEMAND, keep: bool = True, timeout: float | None = None
    ) -> bytes:
        """Blocking form of ``request`` for threads (tests, tools); raises OSError(EIO)."""
        ev = threading.Event()
        box: list[tuple[bytes | None, str]] = []

        def done(plain: bytes | None, error: str) -> None:
            box.append((plain, error))
            ev.set()

        self.request(b, prio, done, keep)
        if not ev.wait(timeout):
            raise TimeoutError(f"block {b}")
        plain, error = box[0]
        if error or plain is None:
            raise OSError(5, error or f"block {b} was not kept")
        return plain

    def status(self) -> dict[str, Any]:
        with self.lock:
            c = vars(self.counters).copy()
            pending = len(self.pending)
            memory = len(self.plain)
            writing = len(self.writing)
        use = self.cache.use()
        return {
            "counters": c,
            "pending": pending,
            "writing": writing,  # fetched blocks not yet in the cache (cache.BatchWriter's queue)
            "writing_later": len(self.writer.later),  # of which waiting for an idle machine
            "memory_blocks": memory,
            "memory_limit": self.memory_limit,
            "throughput_current": self.throughput.current(),
            "throughput_average": self.throughput.average(),
            "cache": vars(use),
        }


@dataclass
class _Stream:
    last: int  # last block read
    near: int  # first block not yet requested into memory
    far: int  # first block not yet requested into the cache
    streak: int = 0
    ahead: int = 0  # how far ahead this stream reads now: doubles while it stays sequential


class ReadAhead:
    """Sequential read detection: once a stream of reads has moved forward block by block a
    couple of times, the next ``near`` blocks are loaded into memory and the ``window``
    after the reader are fetched into the cache (many transfers in flight: what hides
    latency), without holding them all in memory. A few streams are tracked at once, so a
    filesystem's metadata reads in between, or two files read at once, do not break one.

    Only reads that continue from the stream's last block count as sequential (a jump forward
    inside the window keeps the stream but does not extend it), and the distance ahead starts
    at ``START`` blocks and doubles with each such step, up to ``window``, as the kernel's own
    read-ahead ramps up. A boot's reads are scattered, with many short forward runs: replaying
    the benchmark guest's 683 boot reads (issue 7), a full window after each run fetched 381
    blocks beside the 172 read (41 MB of zstd where 12.9 MB were needed); now 25 more (15.4
    MB). A long sequential read reaches the full window after six blocks.

    Neighbours: the blocks a boot reads cluster even where its reads do not run in sequence
    (121 of those 172 blocks lie next to another one read), so every read also fetches the
    block after it into the cache, and a read that waits for the network the block before it.
    In that replay the reads that found a block not yet asked for fell from 146 to 78 (each
    waits a round trip at 100 ms), for 73 more blocks fetched and never read (98 in all)."""

    STREAMS = 4
    START = 2

    def __init__(self, dev: BlockDevice, window: int, near: int = 8) -> None:
        self.dev = dev
        self.window = window
        self.near = min(near, window)
        self.streams: list[_Stream] = []

    def note(self, first: int, last: int) -> None:
        """Blocks FIRST..LAST were just asked for by a read (after its own requests)."""
        if self.window <= 0:
            return
        self._ahead(last + 1)
        if not self.dev.is_local(first):  # still on its way: this read waits for the network
            self._ahead(first - 1)
        s = next((s for s in self.streams if s.last - 1 <= first <= max(s.far, s.last + 1)), None)
        if s is None:
            self.streams.insert(0, _Stream(last=last, near=last + 1, far=last + 1))
            del self.streams[self.STREAMS :]
            return
        self.streams.remove(s)
        self.streams.insert(0, s)
        moved = last > s.last and first <= s.last + 1  # onward from where it was, not a jump
        if moved:
            s.streak += 1
        s.last = max(s.last, last)
        if s.streak < 2:
            return
        if moved:
            s.ahead = min(self.window, s.ahead * 2 if s.ahead else self.START)
        nblocks = self.dev.index.nblocks
        s.near = max(s.near, s.last + 1)
        end = min(s.last + 1 + min(self.near, s.ahead), nblocks)
        while s.near < end:
            b = s.near
            s.near += 1
            if not self.dev.index.is_hole(b) and (self.dev.fetcher is not None or self.dev.is_local(b)):
                self.dev.request(b, READAHEAD, _ignore)
        s.far = max(s.far, s.near)
        end = min(s.last + 1 + s.ahead, nblocks)
        while s.far < end:
            b = s.far
            s.far += 1
            self._ahead(b)

    def _ahead(self, b: int) -> None:
        """Block b into the cache, unless it is past either end of the image or a hole."""
        if 0 <= b < self.dev.index.nblocks and not self.dev.index.is_hole(b):
            self.dev.ahead(b)


def _ignore(plain: bytes | None, error: str) -> None:
    pass


class Prefetcher:
    """Fetch a list of blocks in order into the cache, ``depth`` at a time, in the background."""

    def __init__(
        self, dev: BlockDevice, order: Iterable[int], depth: int, what: str, copy: LocalCopy | None = None
    ) -> None:
        self.dev = dev
        self.order = list(order)
        # with a local copy the blocks also go there, decompressed (the boot profile: the root
        # stage waits for them, then the boot reads them without the daemon): fewer in flight,
        # since each waits in memory for its write
        self.copy = copy
        self.depth = max(1, min(depth, COPY_DEPTH) if copy is not None else depth)
        self.what = what
        self.slots = threading.Semaphore(self.depth)
        self.stopping = False
        self.done = 0
        self.failed = 0
        self.total = len(self.order)
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> Prefetcher:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)

    def _run(self) -> None:
        t0 = time.monotonic()
        idx = self.dev.index
        log.info("prefetch (%s): %d blocks, %d in flight", self.what, self.total, self.depth)
        outstanding = threading.Semaphore(0)
        issued = 0
        seen: set[str] = set()
        copy = self.copy
        handoff: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()

        def to_copy() -> None:
            """Blocks delivered so far into the copy, waiting for its writer when it lags:
            this thread then issues no more requests (memory stays bounded)."""
            while copy is not None:
                try:
                    b2, plain2 = handoff.get_nowait()
                except queue.Empty:
                    return
                copy.add(b2, plain2, wait=True)

        for b in self.order:
            if self.stopping:
                break
            to_copy()
            if idx.is_hole(b):
                self.done += 1
                continue
            d = idx.digest_hex(b)
            if copy is not None:
                # every place of a block goes to the copy, so no dedup; a block the copy
                # carries over from the last version's is left to it (disk to disk; dm-verity checks it)
                if copy.will_have(b):
                    self.done += 1
                    continue
            elif d in seen or self.dev.is_local(b):
                self.done += 1
                continue
            seen.add(d)
            while not self.slots.acquire(timeout=0.2):
                if self.stopping:
                    break
            if self.stopping:
                break
            issued += 1

            def done(plain: bytes | None, error: str, b: int = b) -> None:
                if error:
                    self.failed += 1
                elif plain is not None and copy is not None:
                    handoff.put((b, plain))
                self.done += 1
                self.slots.release()
                outstanding.release()

            self.dev.request(b, PREFETCH, done, keep=copy is not None)
        waited = 0
        while waited < issued and not self.stopping:
            if outstanding.acquire(timeout=0.2):
                waited += 1
            to_copy()
        to_copy()
        dt = time.monotonic() - t0
        log.info(
            "prefetch (%s) %s: %d blocks in %.1fs, %d failed",
            self.what,
            "stopped" if self.stopping else "complete",
            self.done,
            dt,
            self.failed,
        )
        self.finished.set()

    def status(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "complete": self.finished.is_set(),
        }


class Recorder:
    """The order in which blocks are first read, written atomically every ``interval`` seconds
    while it changes, and at the end."""

    def __init__(self, path: Path, nblocks: int, interval: float = 2.0) -> None:
        self.path = path
        self.nblocks = nblocks
        self.interval = interval
        self.t0 = time.monotonic()
        self.blocks: list[int] = []
        self.times: list[float] = []
        self.seen: set[int] = set()
        self.written = 0
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self) -> Recorder:
        self.thread.start()
        return self

    def note(self, first: int, last: int) -> None:
        if first in self.seen and last in self.seen:
            return
        t = time.monotonic() - self.t0
        with self.lock:
            for b in range(first, last + 1):
                if b not in self.seen:
                    self.seen.add(b)
                    self.blocks.append(b)
                    self.times.append(t)

    def flush(self) -> None:
        with self.lock:
            if len(self.blocks) == self.written:
                return
            blocks_, times = list(self.blocks), list(self.times)
        write_atomic(self.path, profilemod.encode(blocks_, times, nblocks=self.nblocks))
        self.written = len(blocks_)

    def _run(self) -> None:
        while not self.stop_ev.wait(self.interval):
            try:
                self.flush()
            except OSError as e:
                log.warning("cannot write trace %s: %s", self.path, e.strerror)

    def stop(self) -> None:
        self.stop_ev.set()
        self.thread.join(5)
        self.flush()
        log.info("trace: %d blocks written to %s", self.written, self.path)


def mirrors_status(ms: MirrorSet | None) -> list[dict[str, object]]:
    if ms is None:
        return []
    return [m.to_json() for m in ms.order()]
