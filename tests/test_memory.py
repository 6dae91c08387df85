"""The block daemon's memory budget (agent/blockdev.BlockDevice.fit_memory): decompressed
blocks are kept for re-reads while the resident size allows, and dropped when it does not.

A real block device over a real cache directory; the resident size is passed in (the daemon's
trim thread reads it from /proc/self/statm), so each case sets exactly the memory it tests."""

from __future__ import annotations

import os
from pathlib import Path

from seedboot.agent import blocks
from seedboot.agent.blockdev import DEFER_RSS, MIN_MEMORY_BLOCKS, BlockDevice
from seedboot.agent.cache import BlockCache
from seedboot.agent.index import Index

BS = 64 * 1024
N = 40
MB = 1024 * 1024


def _device(tmp_path: Path, memory_blocks: int = 24) -> tuple[BlockDevice, list[bytes]]:
    cache = BlockCache(tmp_path / "cache")
    index = Index(block_size=BS, image_size=N * BS)
    plains, stored_blocks = [], []
    for i in range(N):
        plain = os.urandom(BS // 2) + bytes([i]) * (BS // 2)
        stored = blocks.compress(plain)
        stored_blocks.append((blocks.name_of(stored), stored))
        index.digests.append(bytes.fromhex(blocks.name_of(stored)))
        index.lengths.append(len(stored))
        plains.append(plain)
    cache.put_many(stored_blocks)
    return BlockDevice(index, cache, None, memory_blocks=memory_blocks), plains


def _read_all(dev: BlockDevice, plains: list[bytes]) -> None:
    for i, plain in enumerate(plains):
        assert dev.wait_block(i, timeout=10) == plain


def test_memory_starts_small_and_grows_with_room_up_to_the_cap(tmp_path: Path) -> None:
    dev, plains = _device(tmp_path)
    try:
        _read_all(dev, plains)
        assert len(dev.plain) == MIN_MEMORY_BLOCKS, "before any measurement only the floor is kept"
        dev.fit_memory(rss=10 * MB, budget=100 * MB)  # 90 MB of room
        _read_all(dev, plains)
        assert len(dev.plain) == 24, "with room, up to memory_blocks and no more"
        before = dev.counters.from_cache
        for i in range(N - 24, N):  # the last 24 read are all in memory
            dev.wait_block(i, timeout=10)
        assert dev.counters.from_cache == before
    finally:
        dev.close()


def test_over_the_budget_blocks_are_dropped_oldest_first_down_to_the_floor(tmp_path: Path) -> None:
    dev, plains = _device(tmp_path)
    try:
        dev.fit_memory(rss=10 * MB, budget=100 * MB)
        _read_all(dev, plains)
        assert len(dev.plain) == 24
        dev.fit_memory(rss=100 * MB + 5 * BS, budget=100 * MB)  # 5 blocks over
        assert len(dev.plain) == 19
        assert dev.index.digest_hex(N - 1) in dev.plain, "the newest stay"
        assert dev.index.digest_hex(N - 24) not in dev.plain, "the oldest went"
        dev.fit_memory(rss=500 * MB, budget=100 * MB)
        assert len(dev.plain) == MIN_MEMORY_BLOCKS, "never below the floor"
        _read_all(dev, plains)  # dropped blocks read back from the cache, still correct
        assert len(dev.plain) == MIN_MEMORY_BLOCKS
    finally:
        dev.close()


def test_profile_blocks_wait_for_their_cache_write_only_within_the_budget(tmp_path: Path) -> None:
    """The profile's blocks may wait in memory for an idle machine (cache.BatchWriter later),
    but never past DEFER_RSS, counting what waits since the last measurement; a measurement
    that finds room again lets more wait. Other prefetches never wait."""
    dev, _ = _device(tmp_path)
    try:
        assert DEFER_RSS < 64 * MB, "the daemon's memory target (issue 3)"
        dev.defer_rss = 100 * MB
        dev.fit_memory(rss=90 * MB, budget=100 * MB)
        assert not dev.defer_write(MB), "not the profile's prefetch: written at once"
        dev.defer_prefetched = True
        assert [dev.defer_write(3 * MB) for _ in range(4)] == [True, True, True, False]
        assert not dev.defer_write(2 * MB), "10 MB of room: 9 taken, 1 left"
        assert dev.defer_write(MB)
        dev.fit_memory(rss=95 * MB, budget=100 * MB)  # some were written meanwhile
        assert dev.defer_write(5 * MB) and not dev.defer_write(1)
        dev.fit_memory(rss=120 * MB, budget=100 * MB)
        assert not dev.defer_write(1), "over the budget nothing waits"
    finally:
        dev.close()
