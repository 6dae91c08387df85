"""The block daemon's memory budget (agent/blockdev.BlockDevice.fit_memory): decompressed
blocks are kept for re-reads while the resident size allows, and dropped when it does not.

A real block device over a real cache directory; the resident size is passed in (the daemon's
trim thread reads it from /proc/self/statm), so each case sets exactly the memory it tests."""

from __future__ import annotations

import os
from pathlib import Path

from seedboot.agent import blocks
from seedboot.agent.blockdev import MIN_MEMORY_BLOCKS, BlockDevice
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
