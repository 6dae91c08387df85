"""A TCP proxy that adds network latency (and optionally a bandwidth cap) in user space.

This machine's kernel has no netem, so tests and benchmarks put this proxy between a client
(pycurl, QEMU's curl driver, nbdkit, a guest at 10.0.2.2) and nginx.

Model: each direction is a link with a one-way delay of ``rtt / 2``. A chunk read at time t
is written at t + rtt/2; chunks stay in order, and reading never waits for the delay, so a
pipelined stream keeps its bandwidth (the delay is latency, not a per-chunk pause). A fresh
connection also pays one RTT before its first byte goes upstream, as TCP's handshake would
(``handshake=False`` turns that off). With ``rate`` (bytes/s), each direction is also paced
like a link of that capacity: per connection (``rate_scope="connection"``) or shared by all
connections (``rate_scope="total"``).

API (stable; used by tests and benchmarks)::

    from seedboot.tools.latency_proxy import LatencyProxy

    with LatencyProxy(upstream=("127.0.0.1", 8080), rtt=0.1) as p:
        fetch(p.url + "/file")      # p.url == f"http://127.0.0.1:{p.port}"
        p.bytes_up, p.bytes_down    # bytes forwarded client->upstream, upstream->client
        p.connections               # connections accepted so far
        p.rtt = 0.0                 # takes effect for chunks read from now on
        p.reset_counters()

``LatencyProxy(upstream, rtt=0.0, rate=None, rate_scope="connection", listen=("127.0.0.1", 0),
handshake=True, trace=False)``: ``listen=("0.0.0.0", 0)`` lets a QEMU guest reach it at
10.0.2.2:port. With ``trace=True``, ``p.trace`` lists ``(seconds since start, bytes_up,
bytes_down)`` per forwarded chunk (cumulative counters), for traffic-over-time plots.
``start()``/``stop()`` do what the ``with`` block does. The proxy runs its own asyncio event
loop in a daemon thread, so it works from synchronous code.

Command line: ``seedboot proxy --listen 127.0.0.1:9000 --upstream 127.0.0.1:8080 --rtt 100ms
[--rate 10M]`` (see ``proxy_cmd``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
# Bytes read but not yet written, per direction, before reading pauses (flow control):
# above the bandwidth-delay product of anything this machine does (~440 MB/s x 50 ms).
MAX_BUFFERED = 64 * 1024 * 1024

RateScope = Literal["connection", "total"]


@dataclass
class _Pacer:
    """A link of ``rate`` bytes/s: when the last queued byte finishes its transmission."""

    rate: float
    busy_until: float = 0.0

    def transmit(self, now: float, nbytes: int) -> float:
        start = max(now, self.busy_until)
        self.busy_until = start + nbytes / self.rate
        return self.busy_until


@dataclass
class _Direction:
    """One way of one connection: chunks waiting for their send time."""

    queue: collections.deque[tuple[float, bytes | None]] = field(default_factory=collections.deque)
    buffered: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class _Server:
    """The asyncio side: one listening socket, two delayed pumps per connection."""

    def __init__(
        self,
        upstream: tuple[str, int],
        rtt: float,
        rate: float | None,
        rate_scope: RateScope,
        handshake: bool,
        trace: bool,
    ) -> None:
        self.upstream = upstream
        self.rtt = rtt
        self.rate = rate
        self.rate_scope = rate_scope
        self.handshake = handshake
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.t0 = time.monotonic()
        self.trace: list[tuple[float, int, int]] | None = [] if trace else None
        self._shared: dict[str, _Pacer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def listen(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accepted, host, port, reuse_address=True)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _pacer(self, way: str) -> _Pacer | None:
        if self.rate is None:
            return None
        if self.rate_scope == "total":
            return self._shared.setdefault(way, _Pacer(self.rate))
        return _Pacer(self.rate)

    async def _accepted(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        accepted = asyncio.get_running_loop().time()
        try:
            try:
                up_r, up_w = await asyncio.open_connection(*self.upstream)
            except OSError as e:
                log.warning("upstream %s:%d refused a connection: %s", *self.upstream, e)
                client_w.close()
                return
            # The client's first byte leaves once the emulated handshake (one RTT) is done.
            not_before = accepted + self.rtt if self.handshake else 0.0

            def abort() -> None:
                for w in (client_w, up_w):
                    w.close()

            # Cancelled only when the proxy stops; this task is the connection's top level.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(
                    self._pump(client_r, up_w, "up", not_before, abort),
                    self._pump(up_r, client_w, "down", 0.0, abort),
                    return_exceptions=True,
                )
            abort()
        finally:
            self._tasks.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        way: str,
        not_before: float,
        abort: Callable[[], None],
    ) -> None:
        """Read as fast as the peer sends, queue each chunk with its send time."""
        d = _Direction()
        pacer = self._pacer(way)
        send = asyncio.create_task(self._send(d, writer, way, abort))
        try:
            loop = asyncio.get_running_loop()
            while True:
                try:
                    data = await reader.read(CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                now = loop.time()
                leaves = now if pacer is None or not data else pacer.transmit(now, len(data))
                d.queue.append((max(leaves, not_before) + self.rtt / 2, data or None))
                d.buffered += len(data)
                d.ready.set()
                if not data:
                    break
                while d.buffered > MAX_BUFFERED and not send.done():
                    d.drained.clear()
                    await d.drained.wait()
                if send.done():
                    break
            await send
        finally:
            send.cancel()
            with contextlib.suppress(BaseException):
                await send

    async def _send(
        self, d: _Direction, writer: asyncio.StreamWriter, way: str, abort: Callable[[], None]
    ) -> None:
        """Write each chunk at its time; a failed write ends the whole connection."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not d.queue:
                    d.ready.clear()
                    await d.ready.wait()
                when, data = d.queue.popleft()
                delay = when - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if data is None:
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                d.buffered -= len(data)
                d.drained.set()
                if way == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                if self.trace is not None:
                    self.trace.append((time.monotonic() - self.t0, self.bytes_up, self.bytes_down))
        except (ConnectionError, OSError):
            abort()
        finally:
            d.drained.set()


class LatencyProxy:
    """The proxy in a background thread with its own event loop (see the module docstring)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        rtt: float = 0.0,
        rate: float | None = None,
        rate_scope: RateScope = "connection",
        listen: tuple[str, int] = ("127.0.0.1", 0),
        handshake: bool = True,
        trace: bool = False,
    ) -> None:
        if rtt < 0:
            raise ValueError(f"rtt must be >= 0, not {rtt}")
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s, not {rate}")
        self.listen = listen
        self._server = _Server(upstream, rtt, rate, rate_scope, handshake, trace)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.listen[0] in ("0.0.0.0", "") else self.listen[0]
        return f"http://{host}:{self.port}"

    @property
    def rtt(self) -> float:
        return self._server.rtt

    @rtt.setter
    def rtt(self, value: float) -> None:
        self._server.rtt = value

    @property
    def bytes_up(self) -> int:
        return self._server.bytes_up

    @property
    def bytes_down(self) -> int:
        return self._server.bytes_down

    @property
    def connections(self) -> int:
        return self._server.connections

    @property
    def trace(self) -> list[tuple[float, int, int]]:
        return list(self._server.trace or [])

    def reset_counters(self) -> None:
        """Zero the byte and connection counters, and restart the trace clock."""
        s = self._server
        s.bytes_up = s.bytes_down = s.connections = 0
        s.t0 = time.monotonic()
        if s.trace is not None:
            s.trace.clear()

    def start(self) -> LatencyProxy:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self.port = loop.run_until_complete(self._server.listen(*self.listen))
            except BaseException as e:
                failure.append(e)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._server.close())
            loop.close()

        self._thread = threading.Thread(target=run, name="latency-proxy", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        log.info(
            "latency proxy %s -> %s:%d, rtt %.0f ms",
            self.url,
            *self._server.upstream,
            self._server.rtt * 1000,
        )
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def serve_forever(
    listen: tuple[str, int],
    upstream: tuple[str, int],
    rtt: float,
    rate: float | None = None,
    rate_scope: RateScope = "connection",
    handshake: bool = True,
    report_every: float = 10.0,
) -> None:
    """Run the proxy in the current event loop until cancelled (the command line's entry)."""
    server = _Server(upstream, rtt, rate, rate_scope, handshake, trace=False)
    port = await server.listen(*listen)
    print(
        f"proxying {listen[0]}:{port} -> {upstream[0]}:{upstream[1]}, rtt {rtt * 1000:.0f} ms"
        + (f", rate {rate / 1e6:.3g} MB/s per {rate_scope}" if rate else ""),
        flush=True,
    )
    last = (0, 0)
    try:
        while True:
            await asyncio.sleep(report_every)
            now = (server.bytes_up, server.bytes_down)
            if now != last:
                print(
                    f"{server.connections} connections, {now[0]} bytes up, {now[1]} bytes down",
                    flush=True,
                )
                last = now
    finally:
        await server.close()
