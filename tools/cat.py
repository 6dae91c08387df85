"""Rebuild a published image byte for byte, verifying everything on the way.

The output is written to ``FILE.tmp`` (holes left sparse), synced, then renamed over
``FILE``, so a failed or interrupted rebuild never leaves a half image under the real name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent import layout, signature
from seedboot.agent.errors import SeedError
from seedboot.agent.index import max_stored_len
from seedboot.tools import verify

log = logging.getLogger(__name__)


@dataclass
class CatResult:
    name: str
    version: int
    image_size: int
    blocks: int
    fetched: int
    fetched_bytes: int
    holes: int
    seconds: float


def cat_release(
    location: str,
    name: str,
    keys: list[signature.PublicKey],
    out: Path,
    version: int | None = None,
    conns: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> CatResult:
    t0 = time.monotonic()
    _reader, rel, _key_id = verify.open_checked(location, name, keys, version)
    idx = rel.index
    refs = verify.distinct_blocks(idx)
    positions: dict[str, list[int]] = {}
    for i in range(idx.nblocks):
        if not idx.is_hole(i):
            positions.setdefault(idx.digest_hex(i), []).append(i)
    out = Path(out)
    tmp = out.parent / f"{out.name}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise SeedError(f"cannot write {tmp}: {e.strerror}", "check --out") from e
    fetched_bytes = 0
    done = 0
    ok = False
    try:
        os.ftruncate(fd, idx.image_size)  # holes stay unwritten: a sparse file
        bound = max_stored_len(idx.block_size)
        paths = (layout.block_path(d) for d in refs)
        for path, got in verify.iter_stored(location, paths, conns, bound):
            digest = path.rsplit("/", 1)[-1]
            ref = refs[digest]
            plain = verify.check_block(digest, ref, got, verify.file_of(location, path))
            for i in positions[digest]:
                os.pwrite(fd, plain, i * idx.block_size)
            fetched_bytes += ref.stored_len
            done += ref.count * idx.block_size
            if progress is not None:
                progress(min(done, idx.image_size), idx.image_size)
        os.fsync(fd)
        ok = True
    finally:
        os.close(fd)
        if not ok:
            tmp.unlink(missing_ok=True)
    os.replace(tmp, out)
    res = CatResult(
        name=name,
        version=rel.meta.version,
        image_size=idx.image_size,
        blocks=idx.nblocks,
        fetched=len(refs),
        fetched_bytes=fetched_bytes,
        holes=sum(1 for i in range(idx.nblocks) if idx.is_hole(i)),
        seconds=time.monotonic() - t0,
    )
    log.info("rebuilt %s v%d into %s in %.2fs", name, res.version, out, res.seconds)
    return res
