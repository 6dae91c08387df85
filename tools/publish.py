"""Publish an image as one signed version of a mirror tree.

Order is what makes a publish crash-safe: blocks (temp file + rename), then the index and
profile, then one ``syncfs`` so all of it is on disk, and only then the signed metadata and
finally the ``latest`` pointer. A publish killed at any moment leaves every earlier version
intact and ``latest`` at the previous version; blocks it left behind are reused by the next
publish or removed by ``seedboot gc``.

Versions only go up: the default is the highest existing version + 1. An explicit version
at or below an existing one is refused, except that re-publishing the very same content
(same index and profile) under an existing version re-signs it (new creation and expiry
time): that is how a publisher refreshes metadata before it expires.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from seedboot.agent import blocks, index, layout, metadata, profile
from seedboot.agent.atomic import write_atomic
from seedboot.agent.errors import FormatError, SeedError
from seedboot.tools import keys

log = logging.getLogger(__name__)

DEFAULT_EXPIRES = 30 * 86400
LOCK_NAME = ".lock"
_DURATION_RE = re.compile(r"^(\d+)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_RE = re.compile(r"^(\d+)([kKmM]?)(i?[bB])?$")


def parse_duration(text: str) -> int:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w`` or plain seconds."""
    m = _DURATION_RE.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise SeedError(f"invalid duration {text!r}", "use a positive number with s, m, h, d or w, e.g. 90d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_size(text: str) -> int:
    """``256K``, ``1M``, ``65536``; checked as a block size."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise FormatError(f"invalid block size {text!r}", "use a power of two from 64K to 4M, e.g. 256K")
    n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    return index.check_block_size(n)


@dataclass
class PublishStats:
    image_size: int = 0
    blocks: int = 0
    new: int = 0  # distinct blocks written by this publish
    reused: int = 0  # non-hole blocks already in the mirror, or repeated within the image
    holes: int = 0
    bytes_written: int = 0  # stored bytes of new blocks
    bytes_stored: int = 0  # stored bytes of the distinct blocks this version references
    bytes_plain: int = 0  # plain bytes of the non-hole blocks
    bytes_referenced: int = 0  # stored bytes summed over every non-hole position
    seconds: float = 0.0

    @property
    def compression_ratio(self) -> float:
        return self.bytes_plain / self.bytes_referenced if self.bytes_referenced else 1.0

    @property
    def dedup_ratio(self) -> float:
        return self.bytes_referenced / self.bytes_stored if self.bytes_stored else 1.0

    @property
    def mb_per_s(self) -> float:
        return self.image_size / 1e6 / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"{self.blocks} blocks: {self.new} new, {self.reused} reused, {self.holes} holes; "
            f"{self.bytes_written / 1e6:.1f} MB written, {self.bytes_stored / 1e6:.1f} MB stored "
            f"for {self.image_size / 1e6:.1f} MB of image; compression {self.compression_ratio:.2f}x, "
            f"dedup {self.dedup_ratio:.2f}x; {self.mb_per_s:.1f} MB/s"
        )


@dataclass
class PublishResult:
    name: str
    version: int
    meta: metadata.Metadata
    meta_path: Path
    index_digest: str
    profile_digest: str | None
    resigned: bool
    stats: PublishStats = field(default_factory=PublishStats)


@contextmanager
def lock_mirror(mirror: Path) -> Iterator[None]:
    """One writer at a time (publish, gc): gc must never see a publish's blocks before its index."""
    try:
        mirror.mkdir(parents=True, exist_ok=True)
        fd = os.open(mirror / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SeedError(f"cannot use mirror directory {mirror}: {e.strerror}", "check --mirror") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("mirror %s is locked by another publish or gc; waiting", mirror)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path``: one call instead of an fsync per block."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise SeedError(f"syncfs {path}: {os.strerror(err)}", "is the mirror's disk healthy?")
    finally:
        os.close(fd)


def existing_versions(mirror: Path, name: str) -> list[int]:
    meta_dir = mirror / name / "meta"
    if not meta_dir.is_dir():
        return []
    out = []
    for p in meta_dir.glob("*.json"):
        if p.stem.isdigit():
            out.append(int(p.stem))
    return sorted(out)


def read_latest(mirror: Path, name: str) -> int | None:
    try:
        text = (mirror / layout.latest_path(name)).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _open_image(image: Path) -> tuple[int, int]:
    try:
        fd = os.open(image, os.O_RDONLY)
    except OSError as e:
        raise SeedError(f"cannot read image {image}: {e.strerror}", "check the IMAGE path") from e
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise SeedError(f"image {image} is not a file or block device", "pass a filesystem or disk image")
        size = os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        os.close(fd)
        raise SeedError(f"cannot read image {image}: {e.strerror}") from e
    except SeedError:
        os.close(fd)
        raise
    if size <= 0:
        os.close(fd)
        raise SeedError(f"image {image} is empty", "pass a filesystem or disk image")
    return fd, size


@dataclass
class _Cut:
    digest: bytes  # index.HOLE_DIGEST for a hole
    stored_len: int  # 0 for a hole
    plain_len: int
    written: bool  # this publish wrote the block file (it was not in the mirror)


class _Cutter:
    """Blocks in image order. Workers read (pread), check for a hole, compress, hash and
    write each block: pread, zstd, hashlib and file writes all release the GIL, so both
    cores compress while a worker that waits on the disk stalls only itself. At most
    ``window`` blocks are in flight, so memory stays bounded whatever the image size."""

    def __init__(self, fd: int, mirror: Path, image_size: int, block_size: int, level: int) -> None:
        self.fd = fd
        self.mirror = mirror
        self.image_size = image_size
        self.block_size = block_size
        self.level = level
        self.zero = bytes(block_size)
        self.local = threading.local()
        self.lock = threading.Lock()
        self.claimed: set[bytes] = set()  # digests some worker of this publish handles

    def work(self, i: int) -> _Cut:
        bs = self.block_size
        plain = os.pread(self.fd, bs, i * bs)
        want = min(bs, self.image_size - i * bs)
        if len(plain) != want:
            raise SeedError(f"image changed while publishing: block {i} is short", "publish a stable image")
        if plain == (self.zero if want == bs else self.zero[:want]):
            return _Cut(index.HOLE_DIGEST, 0, want, False)
        cctx = getattr(self.local, "cctx", None)
        if cctx is None:
            import zstandard

            cctx = self.local.cctx = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        stored: bytes = cctx.compress(plain)
        digest = hashlib.sha256(stored).digest()
        with self.lock:
            first = digest not in self.claimed
            self.claimed.add(digest)
        written = first and _write_block(self.mirror, digest.hex(), stored)
        return _Cut(digest, len(stored), want, written)

    def run(self, threads: int) -> Iterator[_Cut]:
        nblocks = index.expected_blocks(self.image_size, self.block_size)
        window = max(4 * threads, (32 << 20) // self.block_size)
        with ThreadPoolExecutor(max_workers=2 * threads, thread_name_prefix="publish") as pool:
            pending: deque[Future[_Cut]] = deque()
            nxt = 0
            try:
                while nxt < nblocks or pending:
                    while nxt < nblocks and len(pending) < window:
                        pending.append(pool.submit(self.work, nxt))
                        nxt += 1
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()


def _write_block(mirror: Path, digest_hex: str, stored: bytes) -> bool:
    """Write a block unless an intact-looking copy (right length) is there; True if written.

    A block from a publish that crashed before its syncfs may be empty or short after a
    power loss, so an existing file of the wrong length is replaced."""
    path = mirror / layout.block_path(digest_hex)
    try:
        if path.stat().st_size == len(stored):
            return False
        log.warning("block %s has the wrong length; rewriting it", digest_hex[:16])
    except FileNotFoundError:
        pass
    write_atomic(path, stored, sync=False)
    return True


def publish(
    image: Path,
    mirror: Path,
    name: str,
    key: keys.SecretKey,
    version: int | None = None,
    block_size: int = index.DEFAULT_BLOCK_SIZE,
    expires: int = DEFAULT_EXPIRES,
    profile_file: Path | None = None,
    mirror_urls: list[str] | None = None,
    level: int = blocks.DEFAULT_LEVEL,
    threads: int | None = None,
    progress: Callable[[int, PublishStats], None] | None = None,
    now: float | None = None,
    verity: bool = False,
) -> PublishResult:
    """Publish ``image`` as version ``version`` (default: the highest + 1) of ``name``.

    With ``verity``, a dm-verity hash tree of the image is stored too and its root hash
    signed in the metadata (tools/verity.py)."""
    layout.check_name(name)
    index.check_block_size(block_size)
    if expires <= 0:
        raise SeedError(f"invalid expiry {expires}s", "metadata must expire in the future")
    if not 1 <= level <= 22:
        raise SeedError(f"invalid zstd level {level}", "use 1 to 22")
    profile_bytes: bytes | None = None
    if profile_file is not None:
        try:
            profile_bytes = Path(profile_file).read_bytes()
        except OSError as e:
            raise SeedError(f"cannot read profile {profile_file}: {e.strerror}", "check --profile") from e
    if threads is not None and threads < 0:
        raise SeedError(f"invalid thread count {threads}", "use a positive number, or 0 for one per core")
    threads = threads or os.cpu_count() or 2
    fd, image_size = _open_image(image)
    t0 = time.monotonic()
    try:
        nblocks = index.expected_blocks(image_size, block_size)
        if profile_bytes is not None:
            profile.parse(profile_bytes, what=f"profile {profile_file}", nblocks=nblocks)
        stats = PublishStats(image_size=image_size, blocks=nblocks)
        with lock_mirror(mirror):
            # Refuse a bad version number before anything is written.
            _choose_version(mirror, name, version)
            verity_meta = None
            if verity:
                from seedboot.tools import verity as verity_tool

                verity_meta = verity_tool.build(image, mirror, name)
            return _publish_locked(
                fd,
                mirror,
                name,
                key,
                version,
                block_size,
                expires,
                profile_bytes,
                mirror_urls or [],
                level,
                threads,
                progress,
                now,
                stats,
                t0,
                verity=verity_meta,
            )
    except OSError as e:
        # The disk filled up or a file cannot be written: nothing is signed yet, so the
        # mirror still serves the versions it had.
        where = f" ({e.filename})" if e.filename else ""
        raise SeedError(
            f"cannot write to mirror {mirror}: {e.strerror}{where}", "check free space and permissions"
        ) from e
    finally:
        os.close(fd)


def _choose_version(mirror: Path, name: str, version: int | None) -> tuple[int, list[int], int | None, int]:
    """The version to publish, the versions there, ``latest`` and the highest of them all."""
    versions = existing_versions(mirror, name)
    latest = read_latest(mirror, name)
    highest = max([*versions, latest or 0])
    if version is None:
        return highest + 1, versions, latest, highest
    if version < 1:
        raise SeedError(f"invalid version {version}", "versions are positive integers")
    if version <= highest and version not in versions:
        raise SeedError(
            f"version {version} of {name} is not above the newest version {highest}",
            f"versions only go up: use --version {highest + 1} or omit --version",
        )
    return version, versions, latest, highest


def _publish_locked(
    fd: int,
    mirror: Path,
    name: str,
    key: keys.SecretKey,
    version: int | None,
    block_size: int,
    expires: int,
    profile_bytes: bytes | None,
    mirror_urls: list[str],
    level: int,
    threads: int,
    progress: Callable[[int, PublishStats], None] | None,
    now: float | None,
    stats: PublishStats,
    t0: float,
    verity: metadata.Verity | None = None,
) -> PublishResult:
    version, versions, latest, highest = _choose_version(mirror, name, version)
    log.info("publishing %s as version %d (block size %d, zstd level %d)", name, version, block_size, level)

    idx = index.Index(block_size=block_size, image_size=stats.image_size)
    seen: set[bytes] = set()
    done = 0
    for cut in _Cutter(fd, mirror, stats.image_size, block_size, level).run(threads):
        done += cut.plain_len
        idx.digests.append(cut.digest)
        idx.lengths.append(cut.stored_len)
        if cut.stored_len == 0:
            stats.holes += 1
        else:
            stats.bytes_plain += cut.plain_len
            stats.bytes_referenced += cut.stored_len
            if cut.digest not in seen:
                seen.add(cut.digest)
                stats.bytes_stored += cut.stored_len
            # The one worker that wrote a repeated block may hold a later position than the
            # first occurrence, so count writes as they come, not by first position.
            if cut.written:
                stats.new += 1
                stats.bytes_written += cut.stored_len
        stats.reused = len(idx.digests) - stats.holes - stats.new
        if progress is not None:
            progress(done, stats)

    index_bytes = idx.encode()
    index_digest = hashlib.sha256(index_bytes).hexdigest()
    profile_digest = hashlib.sha256(profile_bytes).hexdigest() if profile_bytes is not None else None

    resigned = False
    if version in versions:
        old = _read_unverified(mirror, name, version)
        if old is None or (old.index, old.profile) != (index_digest, profile_digest):
            raise SeedError(
                f"version {version} of {name} exists with different content",
                f"versions are immutable: publish as --version {highest + 1} or omit --version",
            )
        resigned = True
        log.info("version %d of %s has the same content; re-signing it", version, name)

    index_file = mirror / layout.index_path(name, index_digest)
    if not index_file.exists() or index_file.stat().st_size != len(index_bytes):
        write_atomic(index_file, index_bytes, sync=False)
    if profile_bytes is not None and profile_digest is not None:
        write_atomic(mirror / layout.profile_path(name, profile_digest), profile_bytes, sync=False)
    # Everything the metadata will name must be on disk before the metadata is.
    syncfs(mirror)

    created = int(now if now is not None else time.time())
    meta = metadata.Metadata(
        name=name,
        version=version,
        created=created,
        expires=created + expires,
        index=index_digest,
        index_size=len(index_bytes),
        image_size=stats.image_size,
        block_size=block_size,
        profile=profile_digest,
        mirrors=list(mirror_urls),
        verity=verity,
    )
    meta_bytes = meta.to_json()
    meta_digest = hashlib.sha256(meta_bytes).hexdigest()
    comment = (
        f"timestamp:{created}\tfile:{version}.json\timage:{name}\tversion:{version}\tsha256:{meta_digest}"
    )
    sig_text = keys.sign(key, meta_bytes, comment)
    meta_file = mirror / layout.meta_path(name, version)
    write_atomic(mirror / layout.sig_path(name, version), sig_text.encode())
    write_atomic(meta_file, meta_bytes)
    if latest is None or version > latest:
        write_atomic(mirror / layout.latest_path(name), f"{version}\n".encode())
    stats.seconds = time.monotonic() - t0
    log.info("published %s v%d: %s", name, version, stats.summary())
    return PublishResult(
        name=name,
        version=version,
        meta=meta,
        meta_path=meta_file,
        index_digest=index_digest,
        profile_digest=profile_digest,
        resigned=resigned,
        stats=stats,
    )


def _read_unverified(mirror: Path, name: str, version: int) -> metadata.Metadata | None:
    """The publisher's own metadata, read without a public key (for version bookkeeping)."""
    try:
        return metadata.parse((mirror / layout.meta_path(name, version)).read_bytes())
    except (OSError, FormatError, json.JSONDecodeError):
        return None
