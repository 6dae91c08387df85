"""The block daemon's fetcher (agent/fetcher.py) against real nginx: which fetched block gets
its digest check first when several wait for it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from seedboot.agent import layout
from seedboot.agent.blocks import compress, name_of
from seedboot.agent.fetcher import DEMAND, MAX_VERIFYING, PREFETCH, Fetcher, Job
from seedboot.agent.mirrors import MirrorSet
from tests.helpers import Nginx


def _until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _publish(www: Path, plains: list[bytes]) -> list[tuple[str, int]]:
    """Each block stored in WWW laid out like a mirror: (digest, stored length) of each."""
    blocks = []
    for plain in plains:
        stored = compress(plain)
        digest = name_of(stored)
        path = www / layout.block_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(stored)
        blocks.append((digest, len(stored)))
    return blocks


def test_a_read_is_verified_before_the_prefetched_blocks_that_arrived_first(
    tmp_path: Path, nginx: Callable[..., Nginx]
) -> None:
    """Under emulation the one CPU checks a block in milliseconds: a block someone reads must
    not wait behind every prefetched block that happened to finish before it, and neither
    must a prefetched block a reader has joined meanwhile (``raise_priority``)."""
    www = tmp_path / "www"
    blocks = _publish(www, [os.urandom(4096) * 4 for _ in range(9)])
    srv = nginx(www)
    fetcher = Fetcher(MirrorSet.from_urls([srv.url]), conns=16, verify_threads=1).start()
    order: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def done(name: str) -> Callable[[bytes | None, bytes | None, str], None]:
        def cb(plain: bytes | None, stored: bytes | None, error: str) -> None:
            ok = stored is not None and plain is not None and len(plain) == 16384
            order.append(name if ok else f"{name} failed: {error}")
            if name == "first":
                entered.set()
                release.wait(30)  # holds the only verify thread while the others arrive

        return cb

    def submit(i: int, name: str, prio: int) -> Job:
        digest, size = blocks[i]
        return fetcher.submit(digest, size, 16384, name, prio, done(name))

    try:
        submit(0, "first", PREFETCH)
        assert entered.wait(30)
        jobs = {f"p{i}": submit(i, f"p{i}", PREFETCH) for i in range(1, 7)}
        _until(lambda: len(fetcher.to_verify) == 6, "six prefetched blocks waiting for their check")
        submit(7, "read", DEMAND)
        _until(lambda: len(fetcher.to_verify) == 7, "the read's block waiting for its check")
        fetcher.raise_priority(jobs["p4"], DEMAND)  # a reader joined that prefetch
        release.set()
        _until(lambda: len(order) == 8, "every block checked")
    finally:
        release.set()
        fetcher.stop()
    # the prefetched ones in the order their transfers ended, which is the network's business
    assert order[:3] == ["first", "p4", "read"] and sorted(order[3:]) == ["p1", "p2", "p3", "p5", "p6"], order


def test_a_stalled_cache_bounds_the_fetched_blocks_held_in_memory(
    tmp_path: Path, nginx: Callable[..., Nginx]
) -> None:
    """When the cache cannot take blocks (its writer is behind), fetched blocks wait in memory
    for their check and write: no more than MAX_VERIFYING of them, however many transfers the
    mirror could serve at once (the daemon's memory target, issue 3)."""
    www = tmp_path / "www"
    blocks = _publish(www, [os.urandom(1024) for _ in range(MAX_VERIFYING + 20)])
    srv = nginx(www)
    fetcher = Fetcher(MirrorSet.from_urls([srv.url]), conns=len(blocks), verify_threads=1).start()
    release = threading.Event()
    checked: list[str] = []

    def done(plain: bytes | None, stored: bytes | None, error: str) -> None:
        release.wait(30)  # the cache writer is stuck: the verify thread waits for a slot
        checked.append(error)

    try:
        # one at a time, each arriving before the next is asked for (as read-ahead asks)
        for i, (digest, size) in enumerate(blocks):
            fetcher.submit(digest, size, 1024, "block", PREFETCH, done, plain=False)
            if i < MAX_VERIFYING:
                _until(lambda n=i + 1: fetcher.verifying == n, f"block {i} waiting for its check")
        time.sleep(0.5)  # what would start now has had the time to arrive
        stats = fetcher.snapshot()
        assert (stats.transfers, stats.queued) == (MAX_VERIFYING, len(blocks) - MAX_VERIFYING)
        release.set()
        _until(lambda: len(checked) == len(blocks), "every block checked once the cache takes them")
    finally:
        release.set()
        fetcher.stop()
    assert checked == [""] * len(blocks)
