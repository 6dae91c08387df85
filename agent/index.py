"""The binary block table of one image version: the contract between publisher and agent.

Layout (big-endian):

    header  28 bytes  magic b"SBIX", u16 format version, u16 reserved (0),
                      u32 block size, u64 image size, u64 block count
    entries 36 bytes  per block: 32-byte SHA-256 of the stored (zstd) bytes, u32 stored length

A hole (all-zero block, not stored) has stored length 0 and an all-zero digest. The last
block may be short; its plain length follows from the image size. The index file is
named by its own SHA-256, which the signed metadata names, so it is verified as a whole.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from seedboot.agent.errors import FormatError

MAGIC = b"SBIX"
FORMAT_VERSION = 1
HEADER = struct.Struct(">4sHHIQQ")
ENTRY = struct.Struct(">32sI")
HOLE_DIGEST = bytes(32)
MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 4 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 256 * 1024


def check_block_size(size: int) -> int:
    if size < MIN_BLOCK_SIZE or size > MAX_BLOCK_SIZE or size & (size - 1):
        raise FormatError(
            f"invalid block size {size}",
            "use a power of two from 64K to 4M, e.g. 256K",
        )
    return size


def max_stored_len(block_size: int) -> int:
    """An upper bound on a zstd frame of one block (ZSTD_compressBound plus slack)."""
    return block_size + (block_size >> 8) + 1024


@dataclass
class Index:
    block_size: int
    image_size: int
    digests: list[bytes] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def nblocks(self) -> int:
        return len(self.digests)

    def is_hole(self, i: int) -> bool:
        return self.lengths[i] == 0

    def digest_hex(self, i: int) -> str:
        return self.digests[i].hex()

    def plain_len(self, i: int) -> int:
        """The decompressed length of block i (the last block may be short)."""
        return min(self.block_size, self.image_size - i * self.block_size)

    def stored_bytes(self) -> int:
        """Bytes a client would fetch for every distinct non-hole block."""
        seen: dict[bytes, int] = {}
        for d, n in zip(self.digests, self.lengths, strict=True):
            if n:
                seen[d] = n
        return sum(seen.values())

    def encode(self) -> bytes:
        check_block_size(self.block_size)
        out = bytearray(HEADER.pack(MAGIC, FORMAT_VERSION, 0, self.block_size, self.image_size, self.nblocks))
        for d, n in zip(self.digests, self.lengths, strict=True):
            out += ENTRY.pack(d, n)
        return bytes(out)

    def digest(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()


def expected_blocks(image_size: int, block_size: int) -> int:
    return -(-image_size // block_size)


def decode(data: bytes) -> Index:
    """Parse and check an index: every size must add up, or FormatError says which."""
    if len(data) < HEADER.size:
        raise FormatError(f"index truncated: {len(data)} bytes, header needs {HEADER.size}")
    magic, version, _reserved, block_size, image_size, nblocks = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"not a seedboot index (magic {magic!r})", "is this a mirror tree?")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"index format version {version} is not supported (this agent reads {FORMAT_VERSION})",
            "update seedboot",
        )
    check_block_size(block_size)
    if nblocks != expected_blocks(image_size, block_size):
        raise FormatError(
            f"index sizes do not add up: {nblocks} blocks of {block_size} for an image of {image_size} bytes"
        )
    want = HEADER.size + nblocks * ENTRY.size
    if len(data) != want:
        raise FormatError(f"index has {len(data)} bytes, its header says {want}")
    bound = max_stored_len(block_size)
    idx = Index(block_size=block_size, image_size=image_size)
    for i, (d, n) in enumerate(ENTRY.iter_unpack(memoryview(data)[HEADER.size :])):
        if n == 0 and d != HOLE_DIGEST:
            raise FormatError(f"index entry {i}: a hole with a digest")
        if n > bound:
            raise FormatError(f"index entry {i}: stored length {n} exceeds the bound {bound}")
        idx.digests.append(bytes(d))
        idx.lengths.append(n)
    return idx
