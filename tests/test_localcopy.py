"""The local copy (agent/localcopy.py) with real parts: nginx, the FUSE daemon with
``--local-copy``, a cache on its own loop-mounted ext4 (the copy's room is a share of that
file system). The next boot's device is assembled here block by block exactly as the root
stage's device-mapper table maps it (``localcopy.segments``); that it equals the published
image is what a user needs. The device-mapper side itself runs in the QEMU boot tests: this
machine's containers have no /dev/mapper."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from seedboot.agent import cache as cache_mod
from seedboot.agent import layout, localcopy
from seedboot.agent import profile as profilemod
from seedboot.agent.index import Index
from seedboot.agent.stages.root import wait_for_copy
from seedboot.tools import keys, publish
from tests.helpers import Nginx
from tests.test_blockdev import NAME, Published, Rig, clean_umount, load_index, published, rig

pytestmark = pytest.mark.root
__all__ = ["published", "rig"]  # fixtures shared with test_blockdev


def own_fs(rig: Rig, name: str, size_mb: int) -> Path:
    img, mnt = rig.tmp / f"{name}.ext4", rig.tmp / name
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-m", "0", str(img), f"{size_mb}M"], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    rig.stack.callback(subprocess.run, ["umount", "-l", str(mnt)], check=False)
    return mnt


def copy_status(m: object, timeout: float = 30) -> dict[str, object]:
    """The copy's status once nothing waits for its write."""
    deadline = time.monotonic() + timeout
    while True:
        cp = m.status()["copy"]  # type: ignore[attr-defined]
        assert isinstance(cp, dict), "the daemon keeps no local copy"
        if not cp["queued"] or time.monotonic() > deadline:
            return cp
        time.sleep(0.1)


def direct_sha256(path: Path) -> str:
    """Read with O_DIRECT: every pass reaches the daemon (the page cache would serve the next)."""
    h = hashlib.sha256()
    buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        while n := os.readv(fd, [buf]):
            h.update(buf[:n])
    finally:
        os.close(fd)
    return h.hexdigest()


def index_digest(mirror: Path, version: int = 1) -> str:
    meta = json.loads((mirror / layout.meta_path(NAME, version)).read_bytes())
    digest: str = meta["index"]
    return digest


def test_copy_holds_the_blocks_read_and_maps_to_the_image(
    published: Published, nginx: Callable[..., Nginx], rig: Rig
) -> None:
    srv = nginx(published.mirror)
    cache = own_fs(rig, "cache", 256)
    m = rig.mount([srv.url], cache, "--prefetch", "off", "--local-copy", pub=published.pub)
    idx = load_index(published.mirror)
    img, map_path = localcopy.paths(cache, NAME, index_digest(published.mirror))
    wanted = {b for b in range(idx.nblocks) if not idx.is_hole(b)}
    # one pass: a block read while the writer was busy is copied once it is idle
    assert direct_sha256(m.disk) == published.image_sha
    deadline = time.monotonic() + 30
    while (copied := localcopy.usable(img, map_path, idx)) != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    assert copied == wanted, f"{len(wanted - copied)} blocks read but not copied: {copy_status(m)}"
    assert not copy_status(m)["stopped"]
    clean_umount(m)

    # the next boot's device: copied blocks and holes from the copy, the rest from the daemon
    image = published.image.read_bytes()
    copy = img.read_bytes()
    bs = idx.block_size
    out = bytearray()
    for first, count, local in localcopy.segments(idx, copied):
        lo, hi = first * bs, min((first + count) * bs, idx.image_size)
        out += copy[lo:hi] if local else image[lo:hi]
    assert hashlib.sha256(out).hexdigest() == published.image_sha
    # holes were never written: the sparse file holds the copied blocks only
    assert img.stat().st_blocks * 512 <= len(copied) * bs + 64 * 1024

    # a torn last entry (a crash mid-append) and an entry past the image are ignored
    with map_path.open("ab") as f:
        f.write(struct.pack("<I", idx.nblocks + 5) + b"\x01\x00")
    assert localcopy.usable(img, map_path, idx) == copied
    # a copy shorter than the image (truncated on the disk) is not used at all
    short = rig.tmp / "short.img"
    short.write_bytes(copy[: idx.image_size // 2])
    assert localcopy.usable(short, map_path, idx) == set()

    # mounted again: the copy is kept and nothing is written twice
    m = rig.mount([srv.url], cache, "--prefetch", "off", "--local-copy", pub=published.pub)
    assert hashlib.sha256(m.disk.read_bytes()).hexdigest() == published.image_sha
    cp = copy_status(m)
    assert cp["blocks"] == len(wanted) and cp["written"] == 0
    clean_umount(m)


def test_whole_blocks_go_direct_and_a_short_last_block_through_the_page_cache(rig: Rig) -> None:
    """Whole blocks are written with O_DIRECT (under emulation a page-cache write cost the
    guest's kernel a page and a writeback per 4 KiB), a last block of another length through
    the page cache: both read back as written, the hole between stays a hole, and the map
    lists both."""
    cache = own_fs(rig, "cache", 64)
    bs = 64 * 1024
    idx = Index(bs, 3 * bs + 1000, [bytes([i]) * 32 for i in range(4)], [1, 1, 0, 1])
    blocks = {0: os.urandom(bs), 1: os.urandom(bs), 3: os.urandom(1000)}
    digest = "ab" * 32
    copy = localcopy.LocalCopy(cache, NAME, idx, digest)
    assert copy.direct_fd is not None, "ext4 takes direct I/O: the direct path must be the one tested"
    for b, plain in blocks.items():
        assert copy.add(b, plain, wait=True)
    copy.close()
    assert not copy.stopped
    img, map_path = localcopy.paths(cache, NAME, digest)
    assert localcopy.usable(img, map_path, idx) == set(blocks)
    data = img.read_bytes()
    assert len(data) == idx.image_size
    for b, plain in blocks.items():
        assert data[b * bs : b * bs + len(plain)] == plain, f"block {b} differs"
    assert data[2 * bs : 3 * bs] == bytes(bs)


def test_a_short_last_block_is_carried_over_like_the_others(rig: Rig) -> None:
    """The old copy is read with O_DIRECT for the carry; a last block of another length is
    read up to the alignment and carried too, not refused by the kernel (EINVAL)."""
    cache = own_fs(rig, "cache", 64)
    bs = 64 * 1024
    hole = bytes(32)
    idx1 = Index(bs, 3 * bs + 1000, [bytes([0]) * 32, bytes([1]) * 32, hole, bytes([3]) * 32], [1, 1, 0, 1])
    (cache / layout.index_path(NAME, idx1.digest())).parent.mkdir(parents=True, exist_ok=True)
    (cache / layout.index_path(NAME, idx1.digest())).write_bytes(idx1.encode())
    blocks = {0: os.urandom(bs), 1: os.urandom(bs), 3: os.urandom(1000)}
    copy1 = localcopy.LocalCopy(cache, NAME, idx1, idx1.digest())
    for b, plain in blocks.items():
        assert copy1.add(b, plain, wait=True)
    copy1.close()
    # v2 changes block 1: blocks 0 and 3 (the short one) are carried
    idx2 = Index(
        bs, 3 * bs + 1000, [bytes([0]) * 32, b"\xee" * 32, bytes([2]) * 32, bytes([3]) * 32], [1, 1, 0, 1]
    )
    copy2 = localcopy.LocalCopy(cache, NAME, idx2, idx2.digest())
    assert copy2.carry_buf is not None, "ext4 takes direct I/O: the direct read must be the one tested"
    deadline = time.monotonic() + 10
    while copy2.status()["carry"] and time.monotonic() < deadline:
        time.sleep(0.05)
    copy2.close()
    assert copy2.status()["carried"] == 2 and not copy2.stopped, copy2.status()
    img, map_path = localcopy.paths(cache, NAME, idx2.digest())
    assert localcopy.usable(img, map_path, idx2) == {0, 3}
    data = img.read_bytes()
    assert data[:bs] == blocks[0] and data[3 * bs :] == blocks[3]


def test_copy_pauses_before_the_cache_file_system_runs_short(
    published: Published, nginx: Callable[..., Nginx], rig: Rig
) -> None:
    srv = nginx(published.mirror)
    cache = own_fs(rig, "small", 40)
    m = rig.mount([srv.url], cache, "--prefetch", "off", "--local-copy", pub=published.pub)
    # a read skips the copy of blocks that find its queue full: read again (past the page
    # cache) until the copy has asked for more room than the file system can spare
    for _ in range(5):
        assert direct_sha256(m.disk) == published.image_sha
        cp = copy_status(m)
        if cp["room"] is False:
            break
    idx = load_index(published.mirror)
    wanted = sum(1 for b in range(idx.nblocks) if not idx.is_hole(b))
    assert cp["room"] is False and not cp["stopped"], cp
    assert isinstance(cp["blocks"], int) and 0 < cp["blocks"] < wanted
    # the copy gave way: the block cache (which a boot cannot do without) was never pushed
    # into eviction, and the file system stays under its high watermark
    st = m.wait_writes()
    assert st["cache"]["evicted"] == 0  # type: ignore[index]
    r = subprocess.run(["df", "--output=avail,size", "-B1", str(cache)], capture_output=True, text=True)
    avail, size = map(int, r.stdout.split()[-2:])
    assert 1 - avail / size <= cache_mod.HIGH
    cmd = [sys.executable, "-m", "seedboot.tools.cli", "status", str(m.mountpoint)]
    status = subprocess.run(cmd, capture_output=True, text=True).stdout
    assert "paused: the cache file system is short of room" in status
    clean_umount(m)


def test_profile_prefetch_fills_the_copy_before_any_read(
    published: Published, nginx: Callable[..., Nginx], rig: Rig
) -> None:
    """What the root stage waits for on a first boot: the boot profile's blocks, fetched and
    verified, decompressed into the copy with nothing read yet."""
    mirror = rig.tmp / "mirror"
    shutil.copytree(published.mirror, mirror)
    idx = load_index(mirror)
    data = [b for b in range(idx.nblocks) if not idx.is_hole(b)]
    order = data[::3][:40]  # scattered, like a boot's
    prof = rig.tmp / "profile"
    prof.write_bytes(profilemod.encode(order))
    publish.publish(
        published.image, mirror, NAME, keys.load_secret_key(published.key), version=2, profile_file=prof
    )
    srv = nginx(mirror)
    cache = own_fs(rig, "cache", 256)
    m = rig.mount([srv.url], cache, "--prefetch", "profile", "--local-copy", pub=published.pub)
    # the root stage's wait, against the real daemon
    said: list[str] = []
    note = wait_for_copy(m.mountpoint / "progress.json", said.append)
    assert note.startswith(f" (the profile's {len(order)} blocks copied first: waited"), note
    # the daemon says so in the file beside the mount, which the wait watched between reads
    # (its check runs every 0.05 s, so it may come just after the progress said so)
    flag = localcopy.settled_flag(m.mountpoint)
    for _ in range(100):
        if flag.read_bytes() == b"1":
            break
        time.sleep(0.05)
    assert flag.read_bytes() == b"1"
    st = m.status()
    pf, cp = st["prefetch"], st["copy"]
    assert isinstance(pf, dict) and isinstance(cp, dict) and pf["complete"] and not cp["queued"]
    assert pf["done"] == len(order) and not pf["failed"]
    img, map_path = localcopy.paths(cache, NAME, index_digest(mirror, 2))
    copied = localcopy.usable(img, map_path, idx)
    assert set(order) <= copied  # (and what the mount's own check that it answers read)
    image, copy = published.image.read_bytes(), img.read_bytes()
    bs = idx.block_size
    assert all(copy[b * bs : (b + 1) * bs] == image[b * bs : (b + 1) * bs] for b in order)
    clean_umount(m)
    assert not localcopy.settled_flag(m.mountpoint).exists()  # it spoke for that mount only
    # their cache writes waited for an idle machine (or the unmount): none is lost
    missing = [b for b in order if not (cache / layout.block_path(idx.digest_hex(b))).is_file()]
    assert not missing, missing


def test_blocks_skipped_while_the_writer_lags_are_copied_once_it_is_idle(
    published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read never waits for the copy's writer, so blocks read while it lags are skipped; the
    writer copies them itself once no block came for a while (from the daemon's memory or
    cache, verified), so the next boot does not read them through the daemon."""
    monkeypatch.setattr(localcopy, "MAX_QUEUED", 4)
    monkeypatch.setattr(localcopy, "BACKFILL_IDLE", 0.1)
    monkeypatch.setattr(localcopy, "MIN_FREE", 0.0)  # tmp_path's file system may be full-ish
    idx = load_index(published.mirror)
    image = published.image.read_bytes()
    bs = idx.block_size
    blocks = [b for b in range(idx.nblocks) if not idx.is_hole(b)]
    asked: list[int] = []

    def plain(b: int) -> bytes:
        return image[b * bs : b * bs + idx.plain_len(b)]

    def backfill(b: int) -> bytes:
        asked.append(b)
        return plain(b)

    copy = localcopy.LocalCopy(tmp_path, NAME, idx, index_digest(published.mirror), backfill=backfill)
    gate = threading.Event()
    write = copy._write

    def stalled(batch: list[tuple[int, bytes]]) -> None:  # a disk far slower than the reads
        gate.wait(10)
        write(batch)

    monkeypatch.setattr(copy, "_write", stalled)
    for b in blocks:
        copy.add(b, plain(b))
    missed = copy.status()["missed"]
    assert isinstance(missed, int) and missed >= len(blocks) - 4, copy.status()
    gate.set()
    deadline = time.monotonic() + 20
    while copy.status()["blocks"] != len(blocks):
        assert time.monotonic() < deadline, copy.status()
        time.sleep(0.05)
    assert copy.status()["backfilled"] == missed
    copy.close()
    assert localcopy.read_map(copy.map, idx.nblocks) == set(blocks)
    assert len(asked) == len(set(asked)) == missed, "each skipped block fetched once"
    data = copy.img.read_bytes()
    assert all(
        data[b * bs : b * bs + idx.plain_len(b)] == image[b * bs : b * bs + idx.plain_len(b)] for b in blocks
    )


def _updated(
    published: Published, tmp_path: Path, profile: list[int] | None = None
) -> tuple[Path, bytearray, list[int], set[int]]:
    """A mirror with v1 and a v2 that changes two of its blocks (v2 with PROFILE, if given)."""
    mirror = tmp_path / "mirror"
    shutil.copytree(published.mirror, mirror)
    idx1 = load_index(mirror)
    data = bytearray(published.image.read_bytes())
    full = [b for b in range(idx1.nblocks) if not idx1.is_hole(b)]
    changed = {full[len(full) // 3], full[2 * len(full) // 3]}
    for b in changed:
        data[b * idx1.block_size + 100] ^= 0xFF
    image2 = tmp_path / "image2.ext4"
    image2.write_bytes(data)
    prof = None
    if profile is not None:
        prof = tmp_path / "profile"
        prof.write_bytes(profilemod.encode(profile))
    publish.publish(image2, mirror, NAME, keys.load_secret_key(published.key), profile_file=prof)  # v2
    return mirror, data, full, changed


def _boot_v1_whole(published: Published, rig: Rig, url: str, cache: Path, mirror: Path) -> tuple[Path, Path]:
    """Read all of v1 through a mount with the local copy, until its copy holds every block."""
    idx1 = load_index(mirror)
    full = {b for b in range(idx1.nblocks) if not idx1.is_hole(b)}
    m = rig.mount([url], cache, "--version", "1", "--prefetch", "off", "--local-copy", pub=published.pub)
    img1, map1 = localcopy.paths(cache, NAME, index_digest(mirror, 1))
    assert direct_sha256(m.disk) == published.image_sha
    deadline = time.monotonic() + 30
    while localcopy.usable(img1, map1, idx1) != full and time.monotonic() < deadline:
        time.sleep(0.1)
    assert localcopy.usable(img1, map1, idx1) == full
    clean_umount(m)
    return img1, map1


def test_a_new_version_takes_over_the_old_copys_unchanged_blocks(
    published: Published, nginx: Callable[..., Nginx], rig: Rig, tmp_path: Path
) -> None:
    """An update changes a few blocks: the new version's copy starts with every other block
    the old copy held, without a read, and the next boot's device is the new image."""
    mirror, data, full, changed = _updated(published, tmp_path)
    srv = nginx(mirror)
    cache = own_fs(rig, "cache", 256)
    img1, map1 = _boot_v1_whole(published, rig, srv.url, cache, mirror)

    m = rig.mount([srv.url], cache, "--prefetch", "off", "--local-copy", pub=published.pub)
    assert m.status()["version"] == 2
    idx2 = load_index(mirror, 2)
    img2, map2 = localcopy.paths(cache, NAME, index_digest(mirror, 2))
    want = set(full) - changed
    deadline = time.monotonic() + 60
    while localcopy.usable(img2, map2, idx2) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    assert localcopy.usable(img2, map2, idx2) == want, copy_status(m)
    # each block written once, all carried: a read through the daemon (the mount's own first
    # reads) leaves a block the copy carries to it
    while (cp := copy_status(m))["carried"] != len(want) and time.monotonic() < deadline:
        time.sleep(0.1)  # the count follows the map's entries
    assert cp["written"] == cp["carried"] == len(want), cp
    assert not img1.exists() and not map1.exists(), "the old version's copy stays on the disk"
    clean_umount(m)

    # the next boot's device: the carried blocks from the copy, the changed ones from the daemon
    copy, image = img2.read_bytes(), bytes(data)
    out = bytearray()
    for first, count, local in localcopy.segments(idx2, want):
        lo, hi = first * idx2.block_size, min((first + count) * idx2.block_size, idx2.image_size)
        out += copy[lo:hi] if local else image[lo:hi]
    assert out == image


def test_an_updates_first_boot_waits_for_the_carried_blocks_and_fetches_only_the_changed(
    published: Published, nginx: Callable[..., Nginx], rig: Rig, tmp_path: Path
) -> None:
    """The first boot of an update with a boot profile: when the root stage's wait ends, the
    new copy holds the profile's blocks and the old copy's unchanged ones, and of the profile
    only the changed blocks went through the daemon (no block verified and decompressed again
    that the disk already held)."""
    idx1 = load_index(published.mirror)
    full = [b for b in range(idx1.nblocks) if not idx1.is_hole(b)]
    changed_guess = {full[len(full) // 3], full[2 * len(full) // 3]}
    order = sorted(set(full[::4][:30]) | changed_guess)
    mirror, data, full, changed = _updated(published, tmp_path, profile=order)
    assert changed == changed_guess
    srv = nginx(mirror)
    cache = own_fs(rig, "cache", 256)
    img1, _ = _boot_v1_whole(published, rig, srv.url, cache, mirror)

    m = rig.mount([srv.url], cache, "--prefetch", "profile", "--local-copy", pub=published.pub)
    # without the daemon's flag file the wait reads the progress every 0.2 s, to the same end
    localcopy.settled_flag(m.mountpoint).unlink(missing_ok=True)
    said: list[str] = []
    note = wait_for_copy(m.mountpoint / "progress.json", said.append)
    want = set(full) - changed
    idx2 = load_index(mirror, 2)
    img2, map2 = localcopy.paths(cache, NAME, index_digest(mirror, 2))
    copied = localcopy.usable(img2, map2, idx2)
    counters, cp = m.status()["counters"], copy_status(m)
    assert want | changed <= copied, (note, cp)
    assert "blocks carried over from the last version's copy: waited" in note, note
    assert note.startswith(f" (the profile's {len(order)} blocks copied first and "), note
    # the changed blocks and at most the mount's own first read, nothing the copy carried
    through_daemon = counters["from_cache"] + counters["fetched"]
    assert len(changed) <= through_daemon <= len(changed) + 2, counters
    assert cp["carried"] >= len(want) - 2 and not cp["carry"], cp
    assert not img1.exists()
    copy = img2.read_bytes()
    bs = idx2.block_size
    assert all(
        copy[b * bs : b * bs + idx2.plain_len(b)] == data[b * bs : b * bs + idx2.plain_len(b)] for b in copied
    )
    clean_umount(m)


def test_settled_reads_the_progress_as_the_root_stage_does() -> None:
    profile = {"what": "profile", "total": 3, "done": 3, "complete": True}
    copying = {"queued": 0, "carry": 0, "carried": 0, "room": True, "stopped": ""}
    assert localcopy.settled({"prefetch": profile, "copy": copying})
    assert not localcopy.settled({"prefetch": dict(profile, complete=False), "copy": copying})
    assert not localcopy.settled({"prefetch": profile, "copy": dict(copying, queued=2)})
    assert not localcopy.settled({"prefetch": profile, "copy": dict(copying, carry=5)})
    # a paused copy (its file system too full) carries nothing more: nothing to wait for
    assert localcopy.settled({"prefetch": profile, "copy": dict(copying, carry=5, room=False)})
    assert localcopy.settled({"prefetch": profile, "copy": dict(copying, stopped="disk full")})
    assert localcopy.settled({"prefetch": {"what": "off", "complete": True}, "copy": copying})
    assert localcopy.settled({"prefetch": profile, "copy": None})


def test_daemon_flags_a_settled_copy_and_stops_watching_one_that_stalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block daemon's side of the flag (a progress function stands in for the daemon's
    counters: the real daemon's flag is checked above)."""
    from seedboot.agent import daemon

    monkeypatch.setattr(daemon, "SETTLED_POLL", 0.01)
    monkeypatch.setattr(daemon, "SETTLED_GIVE_UP", 0.3)
    profile = {"what": "profile", "total": 2, "done": 1, "complete": False}
    state = {"prefetch": profile, "copy": {"queued": 1, "written": 1, "carry": 0, "room": True}}
    flag = localcopy.settled_flag(tmp_path / "mnt")

    def wait_for(want: bytes) -> bytes:
        for _ in range(200):
            if flag.read_bytes() == want:
                break
            time.sleep(0.01)
        return flag.read_bytes()

    daemon._say_when_settled(flag, lambda: state)
    assert flag.read_bytes() == b"0"
    state = {"prefetch": dict(profile, done=2, complete=True), "copy": {"queued": 0, "written": 2}}
    assert wait_for(b"1") == b"1"
    # a copy that makes no progress: the watch ends (its thread with it), the flag stays 0
    stuck = {"prefetch": profile, "copy": {"queued": 1, "written": 1, "carry": 0, "room": True}}
    before = {t.ident for t in threading.enumerate() if t.name == "copy-settled"}
    daemon._say_when_settled(flag, lambda: stuck)
    watching = [t for t in threading.enumerate() if t.name == "copy-settled" and t.ident not in before]
    assert len(watching) == 1
    watching[0].join(5)
    assert not watching[0].is_alive() and flag.read_bytes() == b"0"
