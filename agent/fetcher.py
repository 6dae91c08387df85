"""The background fetcher: one thread runs a pycurl multi loop with many transfers in flight.

Latency is hidden only by requests in flight (PLATFORM-NOTES: a synchronous read handler
caps near 90 MB/s at 5 ms; 32 transfers in flight reach ~440 MB/s), so every block request
goes through one multi handle: keep-alive connections, HTTP/2 multiplexing where an HTTPS
mirror offers it, at most ``conns`` transfers at once. Requests wait in a priority queue:
on-demand reads jump ahead of read-ahead, which jumps ahead of prefetch. One digest is
fetched once however many ask for it (``submit`` merges them and raises the priority).

A finished transfer is verified off the curl thread (digest of the stored bytes, then the
decompressed length); a transport error, timeout, 5xx, 404, wrong length or wrong digest
backs the mirror off and sends the request to the next mirror. When every mirror failed,
the request fails with all the reasons, and the read above it gets EIO.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from seedboot.agent import layout
from seedboot.agent.blocks import check_digest, verify
from seedboot.agent.errors import BlockInvalid
from seedboot.agent.mirrors import Mirror, MirrorSet

log = logging.getLogger(__name__)

DEMAND = 0
READAHEAD = 1
PREFETCH = 2

CONNECT_TIMEOUT = 5.0
# A stalled transfer is abandoned when it moves under LOW_SPEED bytes/s for LOW_SPEED_TIME s.
LOW_SPEED = 4096
LOW_SPEED_TIME = 10
TOTAL_TIMEOUT = 120.0
RETRY_DELAY_MAX = 2.0
# Finished transfers waiting for their check (or, after it, for a cache write slot), at most:
# beyond it no transfer starts. On a fast link blocks arrive faster than the cache takes them,
# and each waits in memory: --prefetch all at 0 ms with 128 transfers had ~120 blocks waiting
# and peaked at 65-67 MB resident; with 48 at most, every cold case peaks under 64.5 MB. At
# 100 ms a cap of 16 held back the next wave of requests (152 -> 112 MB/s); 48 and 64 did not.
MAX_VERIFYING = 48

# (plain bytes or None, stored bytes or None, error text): success when stored is set; plain
# is None when the job did not ask for it (``Job.plain``)
Done = Callable[[bytes | None, bytes | None, str], None]


@dataclass
class Job:
    digest: str
    stored_len: int
    plain_len: int
    what: str
    prio: int
    done: Done
    tried: list[Mirror] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: bool = False
    rounds: int = 0
    # decompress (and check the plain length) here? Not for blocks that only go to the cache:
    # the digest already proves they are what was published, and the cache checks the rest
    # on their first read. Saves a decompression per prefetched block.
    plain: bool = True


@dataclass
class FetchStats:
    transfers: int = 0
    bytes: int = 0
    errors: int = 0
    in_flight: int = 0
    queued: int = 0


@dataclass
class _Buffer:
    """A block's bytes as they arrive, joined once complete. A preallocated buffer of the
    block's size held it all from the start (bytearray(n) writes its n zeros), while at 100 ms
    with many transfers sharing the link most of them are waiting or half received: the
    chunks hold only what arrived, so more transfers fit in the daemon's memory budget."""

    size: int  # what the index says the block is
    chunks: list[bytes] = field(default_factory=list)
    n: int = 0


@dataclass
class _Transfer:
    job: Job
    mirror: Mirror
    buf: _Buffer
    t0: float


class Fetcher:
    def __init__(self, mirrors: MirrorSet, conns: int = 32, verify_threads: int = 2) -> None:
        import pycurl

        self.pycurl: Any = pycurl
        self.mirrors = mirrors
        self.conns = max(1, conns)
        self.prefetch_slots = max(1, self.conns * 3 // 4)
        self.held = False
        # finished transfers waiting for verification still hold their slot: when verifying
        # is the bottleneck, fetching slows down instead of piling up blocks in memory
        self.verifying = 0
        self.to_verify: list[tuple[int, Job, Mirror, bytes]] = []  # (arrival, ...): _verify_next
        self.lock = threading.Lock()
        self.heap: list[tuple[int, int, Job]] = []
        self.seq = itertools.count()
        self.delayed: list[tuple[float, int, Job]] = []
        self.stats = FetchStats()
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        self.multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, self.conns)
        self.multi.setopt(pycurl.M_MAXCONNECTS, self.conns * 2)
        self.free: list[Any] = []
        self.active: dict[Any, _Transfer] = {}
        self.verify_pool = ThreadPoolExecutor(max_workers=verify_threads, thread_name_prefix="verify")
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="fetcher", daemon=True)

    def start(self) -> Fetcher:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self._wake()
        if self.thread.is_alive():
            self.thread.join(10)
        self.verify_pool.shutdown(wait=True, cancel_futures=True)

    # -- API (any thread) ----------------------------------------------------------------

    def submit(
        self,
        digest: str,
        stored_len: int,
        plain_len: int,
        what: str,
        prio: int,
        done: Done,
        plain: bool = True,
    ) -> Job:
        job = Job(digest, stored_len, plain_len, what, prio, done, plain=plain)
        with self.lock:
            heapq.heappush(self.heap, (prio, next(self.seq), job))
        self._wake()
        return job

    def raise_priority(self, job: Job, prio: int) -> None:
        """A job someone now waits for: if still queued, queue it again at the better priority
        (the stale heap entry is skipped when popped); if fetched, its check goes first."""
        with self.lock:
            if prio >= job.prio:
                return
            job.prio = prio
            if job.started:
                return  # on the wire, or waiting for its check, which goes by job.prio
            heapq.heappush(self.heap, (prio, next(self.seq), job))
        self._wake()

    def snapshot(self) -> FetchStats:
        with self.lock:
            s = FetchStats(**vars(self.stats))
            s.queued = sum(1 for p, _, j in self.heap if not j.started and p == j.prio)
            s.in_flight = len(self.active)
        return s

    # -- curl thread ---------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"x")

    def _handle(self) -> Any:
        pycurl = self.pycurl
        if self.free:
            return self.free.pop()
        c = pycurl.Curl()
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(CONNECT_TIMEOUT * 1000))
        c.setopt(pycurl.TIMEOUT_MS, int(TOTAL_TIMEOUT * 1000))
        c.setopt(pycurl.LOW_SPEED_LIMIT, LOW_SPEED)
        c.setopt(pycurl.LOW_SPEED_TIME, LOW_SPEED_TIME)
        c.setopt(pycurl.FOLLOWLOCATION, True)
        c.setopt(pycurl.MAXREDIRS, 3)
        c.setopt(pycurl.TCP_NODELAY, 1)
        return c

    def _pick_mirror(self, job: Job) -> Mirror | None:
        for m in self.mirrors.order():
            if m not in job.tried:
                return m
        return None

    def _start(self, job: Job, m: Mirror) -> None:
        pycurl = self.pycurl
        c = self._handle()
        buf = _Buffer(job.stored_len)

        def write(chunk: bytes) -> int | None:
            n = len(chunk)
            if buf.n + n > buf.size:
                return 0  # a mirror sending more than the index says is wrong: stop at once
            buf.chunks.append(chunk)
            buf.n += n
            return None

        url = f"{m.url}/{layout.block_path(job.digest)}"
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.WRITEFUNCTION, write)
        # PIPEWAIT only where multiplexing can be negotiated; on plain HTTP/1.1 it would hold
        # new transfers back waiting for the first connection's answer.
        c.setopt(pycurl.PIPEWAIT, 1 if url.startswith("https:") else 0)
        job.started = True
        job.tried.append(m)
        self.active[c] = _Transfer(job, m, buf, time.monotonic())
        self.multi.add_handle(c)

    def _room(self, starting: int = 0) -> bool:
        """Whether another transfer may start (with STARTING about to): finished ones waiting
        for their check hold their slot, and past MAX_VERIFYING of them none starts. Called
        with self.lock held."""
        return len(self.active) + self.verifying + starting < self.conns and self.verifying < MAX_VERIFYING

    def _fill(self) -> None:
        now = time.monotonic()
        with self.lock:
            while self.delayed and self.delayed[0][0] <= now:
                _, _, job = heapq.heappop(self.delayed)
                heapq.heappush(self.heap, (job.prio, next(self.seq), job))
            starts: list[tuple[Job, Mirror]] = []
            failed: list[Job] = []
            prefetching = sum(1 for t in self.active.values() if t.job.prio >= PREFETCH)
            self.held = False
            while self.heap and self._room(len(starts)):
                prio, seq, job = heapq.heappop(self.heap)
                if job.started or prio != job.prio:
                    continue
                if prio >= PREFETCH:
                    if prefetching >= self.prefetch_slots:
                        # keep connections free for reads, which would otherwise wait for
                        # a prefetch transfer to finish before theirs can even start
                        heapq.heappush(self.heap, (prio, seq, job))
                        self.held = True
                        break
                    prefetching += 1
                m = self._pick_mirror(job)
                if m is None:
                    failed.append(job)
                    continue
                job.started = True
                starts.append((job, m))
        for job, m in starts:
            self._start(job, m)
        for job in failed:
            self._give_up(job)

    def _run(self) -> None:
        pycurl = self.pycurl
        while not self.stopping:
            self._fill()
            while True:
                ret, _ = self.multi.perform()
                if ret != pycurl.E_CALL_MULTI_PERFORM:
                    break
            while True:
                _, ok, err = self.multi.info_read()
                for c in ok:
                    self._finished(c, "")
                for c, _errno, msg in err:
                    self._finished(c, msg or f"curl error {_errno}")
                if not ok and not err:
                    break
            self._wait()
        for c in list(self.active):
            self.multi.remove_handle(c)
            c.close()
        for c in self.free:
            c.close()
        self.multi.close()

    def _wait(self) -> None:
        r, w, x = self.multi.fdset()
        t = self.multi.timeout()
        timeout = 1.0 if t < 0 else min(t / 1000, 1.0)
        with self.lock:
            if self.delayed:
                timeout = min(timeout, max(0.0, self.delayed[0][0] - time.monotonic()))
            if self.heap and self._room() and not self.held:
                timeout = 0.0
        try:
            ready, _, _ = select.select([*r, self.wake_r], w, x, timeout)
        except InterruptedError:
            return
        if self.wake_r in ready:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def _finished(self, c: Any, curl_error: str) -> None:
        pycurl = self.pycurl
        t = self.active.pop(c)
        self.multi.remove_handle(c)
        status = int(c.getinfo(pycurl.RESPONSE_CODE)) if not curl_error else 0
        self.free.append(c)
        chunks = t.buf.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        with self.lock:
            self.stats.transfers += 1
            self.stats.bytes += len(data)
        if curl_error:
            if len(data) >= t.job.stored_len:
                curl_error = f"more than the {t.job.stored_len} bytes the index says"
            self._failover(t.job, t.mirror, curl_error)
        elif status != 200:
            self._failover(t.job, t.mirror, f"HTTP {status}")
        else:
            with self.lock:
                self.verifying += 1
                self.to_verify.append((next(self.seq), t.job, t.mirror, data))
            self.verify_pool.submit(self._verify_next)

    def _verify_next(self) -> None:
        """Verify the waiting block whose job has the best priority now (a read before
        read-ahead before prefetch; a prefetch a reader has since joined counts as a read).
        In arrival order, a read's block queued behind every prefetched block that finished
        before it: under emulation, one CPU, each check costs milliseconds. One task is
        submitted per block, so each call takes exactly one."""
        with self.lock:
            waiting = self.to_verify
            i = min(range(len(waiting)), key=lambda k: (waiting[k][1].prio, waiting[k][0]))
            _, job, m, data = waiting.pop(i)
        self._verify(job, m, data)

    def _verify(self, job: Job, m: Mirror, data: bytes) -> None:
        try:
            self._check(job, m, data)
        finally:
            with self.lock:
                self.verifying -= 1
            self._wake()

    def _check(self, job: Job, m: Mirror, data: bytes) -> None:
        try:
            if job.plain:
                plain: bytes | None = verify(data, job.digest, job.stored_len, job.plain_len, job.what)
            else:
                check_digest(data, job.digest, job.stored_len, job.what)
                plain = None
        except BlockInvalid as e:
            self._failover(job, m, e.message)
            return
        except Exception as e:  # never lose a job to an unexpected error: fail it visibly
            log.exception("verifying %s", job.what)
            self._failover(job, m, f"verify error: {e}")
            return
        self.mirrors.succeeded(m, len(data))
        job.done(plain, data, "")

    def _failover(self, job: Job, m: Mirror, why: str) -> None:
        with self.lock:
            self.stats.errors += 1
        job.errors.append(f"{m.url}: {why}")
        log.warning("%s (%s) from %s: %s", job.what, job.digest[:16], m.url, why)
        self.mirrors.failed(m, why)
        if self._pick_mirror(job) is None:
            if job.rounds == 0:
                # every mirror failed once: one more round, after the first backoff ends
                job.rounds += 1
                job.tried.clear()
                when = min(
                    min(x.backoff_until for x in self.mirrors.mirrors), time.monotonic() + RETRY_DELAY_MAX
                )
                with self.lock:
                    job.started = False
                    heapq.heappush(self.delayed, (when, next(self.seq), job))
                self._wake()
                return
            self._give_up(job)
            return
        with self.lock:
            job.started = False
            heapq.heappush(self.heap, (job.prio, next(self.seq), job))
        self._wake()

    def _give_up(self, job: Job) -> None:
        why = "; ".join(job.errors) or "no mirror"
        log.error("%s (%s): no mirror delivered a good copy: %s", job.what, job.digest[:16], why)
        job.done(None, None, f"no mirror delivered a good copy: {why}")
