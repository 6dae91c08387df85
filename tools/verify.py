"""Check one published version end to end: signature, expiry, index, profile and every block.

Blocks come from a directory or, over HTTP, through ``agent.fetch.fetch_many`` with many
transfers in flight; each distinct block is fetched once and checked (stored length,
SHA-256, decompressed length) before anything trusts it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from seedboot.agent import blocks, layout, profile, release, signature
from seedboot.agent import verity as averity
from seedboot.agent.errors import BlockInvalid, SeedError
from seedboot.agent.fetch import fetch_many
from seedboot.agent.index import Index, max_stored_len
from seedboot.agent.reader import NotFound, Reader, open_reader

log = logging.getLogger(__name__)


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def file_of(location: str, path: str) -> str:
    """Where a mirror file lives, as a user would look for it (a path or a URL)."""
    return f"{location.rstrip('/')}/{path}" if is_url(location) else str(Path(location) / path)


def iter_stored(
    location: str, paths: Iterable[str], conns: int = 16, max_bytes: int | None = None
) -> Iterator[tuple[str, bytes | SeedError]]:
    """Mirror files as ``(path, bytes or error)``: over HTTP in completion order, else in order."""
    if is_url(location):
        yield from fetch_many([location], paths, conns=conns, max_bytes=max_bytes)
        return
    root = Path(location)
    for p in paths:
        try:
            yield p, (root / p).read_bytes()
        except FileNotFoundError:
            yield p, NotFound(f"{root / p}: missing")
        except OSError as e:
            yield p, SeedError(f"{root / p}: {e.strerror}")


@dataclass
class BlockRef:
    first: int  # the first index position holding this block
    count: int  # how many positions hold it
    stored_len: int
    plain_len: int


def distinct_blocks(idx: Index) -> dict[str, BlockRef]:
    out: dict[str, BlockRef] = {}
    for i in range(idx.nblocks):
        if idx.is_hole(i):
            continue
        d = idx.digest_hex(i)
        ref = out.get(d)
        if ref is None:
            out[d] = BlockRef(i, 1, idx.lengths[i], idx.plain_len(i))
        else:
            ref.count += 1
    return out


def check_block(digest: str, ref: BlockRef, got: bytes | SeedError, where: str) -> bytes:
    """The plain bytes of a good block, or BlockInvalid naming its position, digest and file."""
    more = f" (and {ref.count - 1} more)" if ref.count > 1 else ""
    if isinstance(got, SeedError):
        raise BlockInvalid(f"block #{ref.first}{more} {digest}: {got.message}")
    try:
        return blocks.verify(got, digest, ref.stored_len, ref.plain_len, what=f"block #{ref.first}{more}")
    except BlockInvalid as e:
        raise BlockInvalid(f"{e.message}: {where}") from e


@dataclass
class VerifyReport:
    release: release.Release
    key_id: str
    checked: int = 0
    stored_bytes: int = 0
    problems: list[str] = field(default_factory=list)


def open_checked(
    location: str, name: str, keys: list[signature.PublicKey], version: int | None
) -> tuple[Reader, release.Release, str]:
    reader = open_reader(location)
    rel = release.open_release(reader, name, keys, version)
    sig = signature.parse_signature(rel.sig_text)
    return reader, rel, signature.key_id_str(sig.key_id)


def verify_release(
    location: str,
    name: str,
    keys: list[signature.PublicKey],
    version: int | None = None,
    conns: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Signature, expiry and index problems raise (nothing after them can be trusted);
    block and profile problems are collected, one line each."""
    reader, rel, key_id = open_checked(location, name, keys, version)
    report = VerifyReport(rel, key_id)
    meta = rel.meta
    if meta.profile is not None:
        ppath = layout.profile_path(name, meta.profile)
        try:
            data = reader.get(ppath)
            if hashlib.sha256(data).hexdigest() != meta.profile:
                report.problems.append(f"profile {meta.profile}: digest mismatch: {file_of(location, ppath)}")
            else:
                profile.parse(data, what=f"profile {file_of(location, ppath)}", nblocks=rel.index.nblocks)
        except SeedError as e:
            report.problems.append(e.message)
    if meta.verity is not None:
        vpath = averity.tree_path(name, meta.verity.tree)
        try:
            tree = reader.get(vpath)
            if not averity.is_tree(tree, meta.verity):
                report.problems.append(
                    f"dm-verity tree {meta.verity.tree}: does not match its signed digest or size: "
                    f"{file_of(location, vpath)}"
                )
        except SeedError as e:
            report.problems.append(f"dm-verity tree: {e.message}")
        if meta.verity.tree_zst_size:
            zpath = averity.packed_tree_path(name, meta.verity.tree)
            try:
                averity.unpack_tree(reader.get(zpath), meta.verity, whole=True)
            except (SeedError, ValueError) as e:
                report.problems.append(f"dm-verity tree {file_of(location, zpath)}: {e}")
    refs = distinct_blocks(rel.index)
    bound = max_stored_len(rel.index.block_size)
    seen_bytes, total_bytes = 0, sum(r.stored_len for r in refs.values())
    for path, got in iter_stored(location, (layout.block_path(d) for d in refs), conns, bound):
        digest = path.rsplit("/", 1)[-1]
        ref = refs[digest]
        try:
            check_block(digest, ref, got, file_of(location, path))
            report.checked += 1
            report.stored_bytes += ref.stored_len
        except BlockInvalid as e:
            report.problems.append(e.message)
        seen_bytes += ref.stored_len
        if progress is not None:
            progress(seen_bytes, total_bytes)
    # Completion order is arbitrary over HTTP: report in index order.
    report.problems.sort(key=_position)
    log.info(
        "verified %s v%d: %d blocks, %d problems", name, meta.version, report.checked, len(report.problems)
    )
    return report


def _position(line: str) -> int:
    if line.startswith("block #"):
        return int(line[7:].split()[0])
    return -1
