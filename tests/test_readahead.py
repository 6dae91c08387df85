"""The block daemon's read-ahead policy (agent/blockdev.ReadAhead): what it asks to fetch.

A stand-in device records the requests; the policy itself is what is tested (the real daemon's
read-ahead over nginx is covered by tests/test_blockdev.py)."""

from __future__ import annotations

from collections.abc import Callable

from seedboot.agent.blockdev import ReadAhead


class _Index:
    nblocks = 1024

    def is_hole(self, block: int) -> bool:
        return False


class _Device:
    """Just what ReadAhead calls: requests into memory and fetches into the cache."""

    def __init__(self) -> None:
        self.index = _Index()
        self.fetcher = object()
        self.wanted: set[int] = set()
        self.local: set[int] = set()  # in the cache or in memory: a read of these does not wait

    def request(self, block: int, priority: int, done: Callable[[bytes | None, str], None]) -> None:
        self.wanted.add(block)

    def ahead(self, block: int) -> None:
        self.wanted.add(block)

    def is_local(self, block: int) -> bool:
        return block in self.local


def _replay(reads: list[tuple[int, int]], window: int = 64) -> set[int]:
    dev = _Device()
    ra = ReadAhead(dev, window=window, near=4)  # type: ignore[arg-type]
    for first, last in reads:
        ra.note(first, last)
    return dev.wanted - {b for first, last in reads for b in range(first, last + 1)}


def test_a_sequential_reader_ramps_up_to_the_full_window() -> None:
    extra = _replay([(b, b) for b in range(10)])
    assert max(extra) == 9 + 64, "after a few blocks the whole window is coming"
    assert extra == set(range(10, 74))


def test_the_first_steps_of_a_run_fetch_little() -> None:
    assert _replay([(0, 0), (1, 1)]) == {2}, "two blocks are not a stream yet: only the next block"
    assert _replay([(0, 0), (1, 1), (2, 2)]) == {3, 4}


def test_scattered_forward_reads_fetch_only_their_neighbours() -> None:
    # A file system's metadata and small files: forward, but never block after block. The
    # blocks around them are often read too (the same directory's files): one each side.
    reads = [(b, b) for b in range(3, 300, 3)]
    assert _replay(reads) == {b + d for b in range(3, 300, 3) for d in (-1, 1)}


def test_a_read_that_does_not_wait_fetches_only_the_block_after_it() -> None:
    dev = _Device()
    dev.local = {10}
    ra = ReadAhead(dev, window=64, near=4)  # type: ignore[arg-type]
    ra.note(10, 10)
    assert dev.wanted == {11}, "a block already here: no miss, only the next one"
    ra.note(40, 41)
    assert dev.wanted == {11, 39, 42}, "a read that waits for the network: one each side"


def test_jumps_inside_the_window_keep_the_stream_without_growing_it() -> None:
    seq = [(b, b) for b in range(6)]  # ramped: 2, 4, 8, 16 ahead
    grown = _replay([*seq, (6, 6)])
    jumped = _replay([*seq, (9, 9)])
    assert max(grown) > max(jumped), "a jump does not double the distance ahead"
