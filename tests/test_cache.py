"""The block cache on its own: LRU watermark eviction that spares pinned blocks, and a restart
after a crash mid-write."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from pathlib import Path

import pytest

from seedboot.agent import cache as cache_mod
from seedboot.agent import layout
from seedboot.agent.cache import BlockCache


def block(i: int, size: int = 300) -> tuple[str, bytes]:
    data = i.to_bytes(4, "big") * (size // 4)
    return hashlib.sha256(data).hexdigest(), data


def test_eviction_is_lru_down_to_the_low_mark_and_spares_pinned(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, max_bytes=3000)
    digests = []
    for i in range(10):
        d, data = block(i)
        cache.put(d, data)
        digests.append(d)
    assert cache.use().bytes == 3000 and cache.use().evicted == 0
    assert cache.read(digests[0]) is not None  # 0 is now the most recently used
    pinned = {digests[1]}
    cache.pinned = lambda d: d in pinned
    d, data = block(10)
    cache.put(d, data)  # over the limit: evict down to 75%
    use = cache.use()
    assert use.bytes <= 3000 * 0.75 and use.evicted > 0
    assert cache.has(digests[0]) and cache.has(digests[1]) and cache.has(d)
    assert not cache.has(digests[2]) and not (tmp_path / layout.block_path(digests[2])).exists()
    # what is on disk is what the cache counts, and each file is its digest
    files = list((tmp_path / "blocks").glob("*/*"))
    assert len(files) == use.blocks
    assert all(hashlib.sha256(f.read_bytes()).hexdigest() == f.name for f in files)


def test_restart_drops_partial_writes_and_keeps_lru_order(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path)
    for i in range(3):
        d, data = block(i)
        cache.put(d, data)
        os.utime(cache.path(d), (1000 + i, 1000 + i))
    d0 = block(0)[0]
    cache.touch(d0)  # used last
    # a crash in the middle of a write leaves a temporary file behind
    partial = cache.path(d0).parent / f".{d0}.123.456"
    partial.write_bytes(b"half a blo")
    again = BlockCache(tmp_path)
    assert not partial.exists()
    assert again.use().blocks == 3
    assert list(again.lru)[-1] == d0


def test_concurrent_writers_share_syncs_and_every_block_lands(tmp_path: Path) -> None:
    """Group commit: writers waiting at the same moment share one syncfs, none returns before
    a sync that began after its write, and every block is on disk complete afterwards."""
    cache = BlockCache(tmp_path)
    real_wait = cache.group.wait
    early: list[str] = []

    def wait() -> None:
        seen = cache.group.started
        real_wait()
        if cache.group.finished <= seen:  # the sync waited for must have begun after arrival
            early.append(threading.current_thread().name)

    cache.group.wait = wait  # type: ignore[method-assign]
    blocks = [block(i, 64 * 1024) for i in range(48)]
    threads = [threading.Thread(target=cache.put, args=b) for b in blocks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.group.waits == 48 and not early
    assert 1 <= cache.group.syncs < 48, "writers arriving together shared a sync"
    for d, data in blocks:
        assert cache.path(d).read_bytes() == data
    assert not [p for p in (tmp_path / "blocks").glob("*/.*")], "no temporary file is left"


def test_a_batch_shares_one_sync(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path)
    batch = [block(i, 64 * 1024) for i in range(20)]
    cache.put_many([*batch, batch[0]])  # a digest twice in one batch is written once
    assert cache.group.syncs == 1
    for d, data in batch:
        assert cache.path(d).read_bytes() == data
    assert cache.use().blocks == 20
    assert not [p for p in (tmp_path / "blocks").glob("*/.*")], "no temporary file is left"
    assert BlockCache(tmp_path).use().blocks == 20


def test_batch_writer_groups_a_burst_and_lands_its_tail_at_once(tmp_path: Path) -> None:
    """Blocks arriving in a stream share a few syncs (one per SYNC_INTERVAL), and when the
    stream stops its last blocks are on disk within BURST_GAP and a sync, not an interval
    later: a machine powered off right after a read finds them in the next boot."""
    cache = BlockCache(tmp_path)
    written: list[str] = []
    writer = cache_mod.BatchWriter(cache, 64, written.extend)
    stream = [block(i, 64 * 1024) for i in range(60)]
    t0 = time.monotonic()
    for d, data in stream:
        writer.put(d, data)
        time.sleep(0.01)  # ~100 blocks/s, a profile's pace under emulation
    took = time.monotonic() - t0
    deadline = time.monotonic() + cache_mod.BURST_GAP + 0.25  # < SYNC_INTERVAL
    while len(written) < len(stream) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(written) == sorted(d for d, _ in stream), "the tail landed without waiting for more"
    assert cache.group.syncs <= took / cache_mod.SYNC_INTERVAL + 2, (cache.group.syncs, took)
    for d, data in stream:
        assert cache.path(d).read_bytes() == data
    writer.put(*block(99))
    writer.close()  # writes what is queued
    assert cache.has(block(99)[0])


def test_batch_writer_writes_a_half_full_queue_at_once(tmp_path: Path) -> None:
    """Blocks coming faster than SYNC_INTERVAL: a batch goes to disk once it holds half the
    slots, so a fetch waiting for a slot never waits out the interval (a cold read on a fast
    network went from 186 to 114 MB/s without this)."""
    cache = BlockCache(tmp_path)
    sizes: list[int] = []
    real_put_many = cache.put_many

    def put_many(blocks: list[tuple[str, bytes]]) -> None:
        sizes.append(len(blocks))
        real_put_many(blocks)

    cache.put_many = put_many  # type: ignore[method-assign]
    writer = cache_mod.BatchWriter(cache, 8, lambda _digests: None)
    burst = [block(i, 4096) for i in range(100)]
    for d, data in burst:
        writer.put(d, data)
    writer.close()
    assert sum(sizes) == 100 and max(sizes) <= 4, sizes
    assert all(cache.has(d) for d, _ in burst)


def test_batch_writer_keeps_later_blocks_until_the_machine_idles_or_drains(tmp_path: Path) -> None:
    """The boot profile's blocks (put ``later``) wait while the CPU is busy, and reach the
    cache once it idles, or when the shutdown drains the writer; other blocks go at once."""
    ticks = itertools.count(100)
    busy = True

    def probe() -> tuple[int, int]:  # (idle, all) ticks: busy adds none to idle
        t = next(ticks) * 100
        return (0 if busy else t, t)

    cache = BlockCache(tmp_path)
    written: list[str] = []
    writer = cache_mod.BatchWriter(cache, 8, written.extend, idle=probe)
    later = [block(i, 4096) for i in range(20)]
    now = [block(100 + i, 4096) for i in range(3)]
    for d, data in later:
        writer.put(d, data, later=True)
    for d, data in now:
        writer.put(d, data)
    assert writer.queued_bytes == 23 * 4096
    time.sleep(3 * cache_mod.IDLE_POLL)
    assert sorted(written) == sorted(d for d, _ in now), "busy: only the blocks put at once"
    assert not any(cache.has(d) for d, _ in later)
    busy = False
    deadline = time.monotonic() + 20 * cache_mod.IDLE_POLL
    while len(written) < 23 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(cache.path(d).read_bytes() == data for d, data in later), "idle: written"
    assert writer.queued_bytes == 0 and writer.written_later == 20

    busy = True
    more = [block(200 + i, 4096) for i in range(10)]
    for d, data in more:
        writer.put(d, data, later=True)
    assert writer.drain(10), "the shutdown's drain writes them though the machine is busy"
    assert all(cache.has(d) for d, _ in more)
    writer.put(*block(300), later=True)  # after a drain nothing waits
    deadline = time.monotonic() + 5
    while not cache.has(block(300)[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.has(block(300)[0])
    writer.close()
    idle, total = cache_mod.cpu_idle_ticks()
    assert 0 < idle < total, "this machine's /proc/stat"


def test_batch_writer_writes_later_blocks_at_once_beyond_its_memory_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond LATER_MAX bytes waiting, a block put ``later`` is written like any other, and
    ``close`` writes the waiting ones."""
    monkeypatch.setattr(cache_mod, "LATER_MAX", 5 * 4096)
    cache = BlockCache(tmp_path)
    written: list[str] = []
    writer = cache_mod.BatchWriter(cache, 8, written.extend, idle=lambda: (0, time.monotonic_ns()))
    blocks = [block(i, 4096) for i in range(8)]
    for d, data in blocks:
        writer.put(d, data, later=True)
    deadline = time.monotonic() + 5
    while len(written) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2 * cache_mod.IDLE_POLL)
    assert sorted(written) == sorted(d for d, _ in blocks[5:]), "the three over the bound"
    writer.close()
    assert all(cache.path(d).read_bytes() == data for d, data in blocks)


def test_batch_writer_sleeps_until_woken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no block waiting for idle time the writer thread sleeps (no polling for the life of
    the machine); the first block put ``later`` starts its polls, and a drain wakes it at once.
    IDLE_POLL is made an hour long: only these wakes can get the blocks written in time."""
    cache = BlockCache(tmp_path)
    written: list[str] = []
    polls: list[int] = []

    def probe() -> tuple[int, int]:
        polls.append(1)
        return (0, len(polls) * 100)  # always busy

    writer = cache_mod.BatchWriter(cache, 8, written.extend, idle=probe)
    writer.put(*block(1))
    deadline = time.monotonic() + 5
    while not written and time.monotonic() < deadline:
        time.sleep(0.02)
    assert written == [block(1)[0]], "a block put at once is written at once"
    monkeypatch.setattr(cache_mod, "IDLE_POLL", 0.05)
    time.sleep(0.3)
    assert not polls, "nothing waits for idle time: the writer does not poll"
    later = [block(10 + i) for i in range(3)]
    for d, data in later:
        writer.put(d, data, later=True)
    deadline = time.monotonic() + 5
    while len(polls) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(polls) >= 2, "blocks wait: the writer polls for idle time"
    assert not any(cache.has(d) for d, _ in later), "busy: they wait"
    monkeypatch.setattr(cache_mod, "IDLE_POLL", 3600.0)
    assert writer.drain(10), "the drain woke the writer"
    assert all(cache.path(d).read_bytes() == data for d, data in later)
    writer.close()
