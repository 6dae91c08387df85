"""Mirrors: probe them all at once, rank by time to first byte, fail over, back off, retry.

The probe asks each mirror for a small file (``NAME/latest``) a few times over one
keep-alive connection, all mirrors in parallel, and ranks by the median time to first byte:
what a block fetch will pay per request once connected. What the file said is kept: the
trust stage starts from it instead of asking again. A mirror that fails every sample
ranks last but stays in the list, so it is tried again when its backoff runs out.
"""

from __future__ import annotations

import builtins
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


@dataclass
class Mirror:
    url: str
    ttfb: float | None = None  # median probe time to first byte, seconds; None: not probed or dead
    failures: int = 0  # consecutive
    errors: int = 0  # total
    fetched: int = 0  # blocks delivered
    bytes: int = 0
    backoff_until: float = 0.0
    last_error: str = ""
    probed: builtins.bytes | None = None  # the probed file's content, as the last sample got it

    def to_json(self) -> dict[str, object]:
        return {
            "url": self.url,
            "ttfb_ms": None if self.ttfb is None else round(self.ttfb * 1000, 2),
            "errors": self.errors,
            "fetched": self.fetched,
            "bytes": self.bytes,
            "backed_off_s": round(max(0.0, self.backoff_until - time.monotonic()), 1),
            "last_error": self.last_error,
        }


@dataclass
class MirrorSet:
    """Mirrors in rank order; thread-safe failure accounting."""

    mirrors: list[Mirror]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_urls(cls, urls: list[str]) -> MirrorSet:
        return cls([Mirror(u.rstrip("/")) for u in urls])

    def order(self) -> list[Mirror]:
        """Mirrors to try, best first: those not backed off in rank order, then the backed-off
        ones (soonest available first), so a request still has somewhere to go."""
        now = time.monotonic()
        with self.lock:
            up = [m for m in self.mirrors if m.backoff_until <= now]
            down = sorted((m for m in self.mirrors if m.backoff_until > now), key=lambda m: m.backoff_until)
        return up + down

    def current(self) -> Mirror:
        return self.order()[0]

    def failed(self, m: Mirror, why: str) -> None:
        with self.lock:
            m.failures += 1
            m.errors += 1
            m.last_error = why
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (m.failures - 1))
            m.backoff_until = time.monotonic() + delay
        log.warning("mirror %s: %s; backing off %.0fs", m.url, why, delay)

    def succeeded(self, m: Mirror, nbytes: int) -> None:
        with self.lock:
            if m.failures:
                log.info("mirror %s: working again", m.url)
            m.failures = 0
            m.backoff_until = 0.0
            m.fetched += 1
            m.bytes += nbytes


def _probe_one(url: str, path: str, samples: int, timeout: float) -> tuple[float | None, str, bytes | None]:
    import pycurl

    c = pycurl.Curl()
    times: list[float] = []
    err = ""
    body: bytes | None = None
    try:
        for _ in range(samples):
            buf = io.BytesIO()
            c.setopt(pycurl.URL, f"{url}/{path}")
            c.setopt(pycurl.WRITEDATA, buf)
            c.setopt(pycurl.CONNECTTIMEOUT_MS, int(timeout * 1000))
            c.setopt(pycurl.TIMEOUT_MS, int(timeout * 1000))
            c.setopt(pycurl.NOSIGNAL, 1)
            try:
                c.perform()
            except pycurl.error as e:
                err = str(e.args[-1])
                continue
            status = int(c.getinfo(pycurl.RESPONSE_CODE))
            if status != 200:
                err = f"HTTP {status}"
                continue
            # time to first byte after the connection is up: what every block request pays
            times.append(c.getinfo(pycurl.STARTTRANSFER_TIME) - c.getinfo(pycurl.PRETRANSFER_TIME))
            body = buf.getvalue()
    finally:
        c.close()
    if not times:
        return None, err or "no answer", None
    # the median, by hand: statistics costs the block daemon ~27 ms of imports under emulation
    times.sort()
    mid = len(times) // 2
    return (times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2), "", body


def probe(urls: list[str], path: str, samples: int = 3, timeout: float = 3.0) -> MirrorSet:
    """Probe all mirrors in parallel and rank them; dead ones last, in the order given. A lone
    mirror has nothing to be ranked against: one sample tells that it answers (at 100 ms,
    the other two cost the boot 0.2 s)."""
    ms = MirrorSet.from_urls(urls)
    if len(urls) == 1:
        samples = 1
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        results = list(pool.map(lambda m: _probe_one(m.url, path, samples, timeout), ms.mirrors))
    for m, (ttfb, err, body) in zip(ms.mirrors, results, strict=True):
        m.ttfb = ttfb
        m.probed = body
        if ttfb is None:
            ms.failed(m, f"probe failed: {err}")
    order = sorted(
        range(len(ms.mirrors)),
        key=lambda i: (ms.mirrors[i].ttfb is None, ms.mirrors[i].ttfb or 0.0, i),
    )
    ms.mirrors = [ms.mirrors[i] for i in order]
    log.info(
        "mirrors ranked in %.2fs: %s",
        time.monotonic() - t0,
        ", ".join(f"{m.url} ({'dead' if m.ttfb is None else f'{m.ttfb * 1000:.1f} ms'})" for m in ms.mirrors),
    )
    return ms
