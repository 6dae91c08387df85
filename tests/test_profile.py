from __future__ import annotations

import pytest

from seedboot.agent import profile
from seedboot.agent.errors import FormatError


def test_round_trip_with_and_without_times() -> None:
    assert profile.parse(profile.encode([5, 1, 9], times=[0.1, 0.2, 0.3], nblocks=10), nblocks=10) == [
        5,
        1,
        9,
    ]
    assert profile.parse(profile.encode([3, 3, 2])) == [3, 2]


def test_merge_puts_blocks_early_in_most_traces_first() -> None:
    a = [1, 2, 3, 4]
    b = [1, 3, 2, 5]
    c = [2, 1, 3, 6]
    merged = profile.merge([a, b, c])
    assert merged[:3] in ([1, 2, 3], [2, 1, 3]) and merged[0] == 1
    assert set(merged) == {1, 2, 3, 4, 5, 6}
    assert set(merged[-3:]) == {4, 5, 6}


@pytest.mark.parametrize(
    "data, message",
    [
        (b"1\n2\n", "first line"),
        (b"# seedboot profile v1\nabc\n", "not a block number"),
        (b"# seedboot profile v1\n12\n", "past the image"),
        (b"\xff\xfe", "binary"),
    ],
)
def test_bad_profiles_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        profile.parse(data, nblocks=10)
