"""One block: compress, name, verify. A block is verified before it is decompressed."""

from __future__ import annotations

import hashlib
import threading

import zstandard

from seedboot.agent.errors import BlockInvalid

# Level 9: publish keeps pace with ``zstd -T0 -9`` (benchmarks/publish.py), while at level 3
# one file per block costs as much as compressing it; and it stores ~6% less than level 3,
# bytes every booting client fetches. Publishing happens once, fetching on every first boot.
DEFAULT_LEVEL = 9


def name_of(stored: bytes) -> str:
    return hashlib.sha256(stored).hexdigest()


def compress(plain: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    # A fresh compressor per call keeps this safe to use from several threads.
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(plain)


def check_digest(stored: bytes, digest_hex: str, stored_len: int, what: str = "block") -> None:
    """The first half of ``verify``: length and SHA-256 of the stored bytes."""
    if len(stored) != stored_len:
        raise BlockInvalid(f"{what} {digest_hex[:16]}: {len(stored)} bytes, index says {stored_len}")
    got = hashlib.sha256(stored).hexdigest()
    if got != digest_hex:
        raise BlockInvalid(f"{what} {digest_hex[:16]}: digest mismatch (got {got[:16]})")


_local = threading.local()


def decompress(stored: bytes, digest_hex: str, plain_len: int, what: str = "block") -> bytes:
    """The second half of ``verify``: decompress and check the plain length. Each thread
    keeps one decompression context: a fresh one per block allocates (and faults in) ~100 KiB
    of work space every time."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    try:
        plain = dctx.decompress(stored, max_output_size=plain_len)
    except zstandard.ZstdError as e:
        raise BlockInvalid(f"{what} {digest_hex[:16]}: does not decompress: {e}") from e
    if len(plain) != plain_len:
        raise BlockInvalid(
            f"{what} {digest_hex[:16]}: decompresses to {len(plain)} bytes, expected {plain_len}"
        )
    return plain


def verify(stored: bytes, digest_hex: str, stored_len: int, plain_len: int, what: str = "block") -> bytes:
    """Check stored bytes against the index, then decompress and check the plain length."""
    check_digest(stored, digest_hex, stored_len, what)
    return decompress(stored, digest_hex, plain_len, what)
