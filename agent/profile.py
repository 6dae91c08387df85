"""Boot profiles and access traces: block numbers in first-access order.

Text, one block per line, so a trace can be read and diffed by a person:

    # seedboot profile v1 blocks=16384
    1 0.004
    0 0.005
    517 0.120

The first column is the block number; an optional second column is the time (seconds
since the mount) of its first read, which traces carry and profiles may omit. A published
profile is this text, stored under ``NAME/profiles/<sha256>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from seedboot.agent.errors import FormatError

HEADER = "# seedboot profile v1"


def encode(blocks: Iterable[int], times: Sequence[float] | None = None, nblocks: int | None = None) -> bytes:
    head = HEADER + (f" blocks={nblocks}" if nblocks is not None else "")
    lines = [head]
    for i, b in enumerate(blocks):
        lines.append(f"{b} {times[i]:.3f}" if times is not None else str(b))
    return ("\n".join(lines) + "\n").encode()


def parse(data: bytes, what: str = "profile", nblocks: int | None = None) -> list[int]:
    """Block numbers in order, each once; checked against the image's block count if given."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise FormatError(f"{what}: not a seedboot profile (binary data)") from e
    lines = text.splitlines()
    if not lines or not lines[0].startswith(HEADER):
        raise FormatError(f"{what}: not a seedboot profile (first line must be {HEADER!r})")
    out: list[int] = []
    seen: set[int] = set()
    for n, line in enumerate(lines[1:], start=2):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        field = line.split()[0]
        if not field.isdigit():
            raise FormatError(f"{what}, line {n}: {field!r} is not a block number")
        b = int(field)
        if nblocks is not None and b >= nblocks:
            raise FormatError(f"{what}, line {n}: block {b} is past the image's {nblocks} blocks")
        if b not in seen:
            seen.add(b)
            out.append(b)
    return out


def merge(traces: Sequence[Sequence[int]]) -> list[int]:
    """Blocks read early in most traces first.

    Each block scores its mean position over all traces, positions normalised to [0, 1) by
    the trace's length, and 1.0 (as late as can be) in traces that never read it. So a block
    every boot reads early leads, and a block only one boot touched sinks to the end.
    """
    if not traces:
        return []
    scores: dict[int, list[float]] = {}
    for t, trace in enumerate(traces):
        n = max(len(trace), 1)
        for pos, b in enumerate(trace):
            scores.setdefault(b, [1.0] * len(traces))[t] = pos / n
    return sorted(scores, key=lambda b: (sum(scores[b]) / len(scores[b]), b))
