"""The HTTP block device with real parts: nginx serves a published mirror, the daemon mounts it
through FUSE, a read-only loop device and ext4 sit on it, an overlay on top; every byte read
must match the source. Then broken mirrors, offline use, crashes, eviction and profiles."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.seedboot_runs import fs_state
from seedboot.agent import index as indexmod
from seedboot.agent import layout
from seedboot.agent.quiesce import UNIT, install_unit
from seedboot.tools import keys, publish
from seedboot.tools.latency_proxy import LatencyProxy
from tests.helpers import Nginx, free_port, keypair, make_ext4, make_tree, sha256_file, tree_digests

pytestmark = pytest.mark.root
NAME = "demo"


@dataclass
class Published:
    src: Path
    image: Path
    mirror: Path
    key: Path
    pub: Path
    digests: dict[str, str]
    image_sha: str


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    w = tmp_path_factory.mktemp("published")
    make_tree(w / "src")
    image = make_ext4(w / "src", w / "image.ext4", 64)
    key, pub = keypair(w)
    publish.publish(image, w / "mirror", NAME, keys.load_secret_key(key))
    return Published(w / "src", image, w / "mirror", key, pub, tree_digests(w / "src"), sha256_file(image))


def run(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check, timeout=120)


def seedboot(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = run(sys.executable, "-m", "seedboot.tools.cli", *args, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"seedboot {' '.join(map(str, args))} failed:\n{r.stdout}{r.stderr}")
    return r


@dataclass
class Mount:
    mountpoint: Path
    cache: Path
    log: Path
    pid: int

    @property
    def disk(self) -> Path:
        return self.mountpoint / "disk.img"

    def status(self) -> dict[str, object]:
        result: dict[str, object] = json.loads((self.mountpoint / "status.json").read_bytes())
        return result

    def mirrors(self) -> dict[str, dict[str, Any]]:
        ms: list[dict[str, Any]] = self.status()["mirrors"]  # type: ignore[assignment]
        return {x["url"]: x for x in ms}

    def wait_prefetch(self, timeout: float = 120) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            pf = st["prefetch"]
            assert isinstance(pf, dict)
            # complete, and its last blocks written (cache writes run at low priority)
            if pf.get("complete") and not st["writing"]:
                return pf
            time.sleep(0.2)
        raise AssertionError(f"prefetch not complete after {timeout}s: {self.status()}")

    def wait_writes(self, timeout: float = 30) -> dict[str, object]:
        """The status once no fetched block waits for its cache write (they run at low priority)."""
        deadline = time.monotonic() + timeout
        while (st := self.status())["writing"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert st["writing"] == 0, f"cache writes still running after {timeout} s"
        return st


class Rig:
    """Mounts, loop devices and overlays, all undone at the end even when a test fails."""

    def __init__(self, tmp: Path, stack: ExitStack) -> None:
        self.tmp = tmp
        self.stack = stack
        self.n = 0

    def mount(
        self, mirrors: list[str], cache: Path, *extra: str | Path, pub: Path, check: bool = True
    ) -> Mount:
        self.n += 1
        mp = self.tmp / f"mnt{self.n}"
        mp.mkdir()
        log = self.tmp / f"blockdev{self.n}.log"
        args: list[str | Path] = ["mount", "--name", NAME, "--pubkey", pub, "--cache", cache, "--log", log]
        for url in mirrors:
            args += ["--mirror", url]
        r = seedboot(*args, *extra, mp, check=False)
        if r.returncode != 0:
            if check:
                raise AssertionError(f"mount failed:\n{r.stderr}\nlog:\n{_read(log)}")
            raise MountFailed(r.stderr)
        self.stack.callback(self._force_umount, mp)
        m = Mount(mp, cache, log, 0)
        pid = m.status()["pid"]
        assert isinstance(pid, int)
        m.pid = pid
        return m

    def _force_umount(self, mp: Path) -> None:
        if os.path.ismount(mp):
            try:
                pid = json.loads((mp / "status.json").read_bytes())["pid"]
            except (OSError, ValueError):
                pid = None
            run("umount", "-l", mp, check=False)
            if pid:
                _kill(pid)

    def loop(self, image: Path) -> str:
        dev = run("losetup", "-r", "--direct-io=on", "-f", "--show", image).stdout.strip()
        self.stack.callback(run, "losetup", "-d", dev, check=False)
        return dev

    def fs_mount(self, *args: str | Path) -> Path:
        target = Path(args[-1])
        target.mkdir(parents=True, exist_ok=True)
        run("mount", *args)
        self.stack.callback(run, "umount", "-l", target, check=False)
        return target

    def ext4_overlay(self, m: Mount) -> tuple[str, Path, Path]:
        """disk.img -> ro loop -> ro ext4 -> rw overlay; returns (loop, lower, merged)."""
        dev = self.loop(m.disk)
        lower = self.fs_mount("-o", "ro", dev, self.tmp / f"lower{self.n}")
        up, work = self.tmp / f"up{self.n}", self.tmp / f"work{self.n}"
        up.mkdir()
        work.mkdir()
        merged = self.fs_mount(
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={lower},upperdir={up},workdir={work}",
            self.tmp / f"merged{self.n}",
        )
        return dev, lower, merged


class MountFailed(Exception):
    pass


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def umount_all(rig: Rig) -> None:
    rig.stack.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with ExitStack() as stack:
        yield Rig(tmp_path, stack)


def clean_umount(m: Mount) -> None:
    seedboot("umount", m.mountpoint)
    assert not os.path.ismount(m.mountpoint)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(m.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"daemon {m.pid} still running after umount")


def cache_blocks(cache: Path) -> dict[str, Path]:
    return {p.name: p for p in (cache / "blocks").glob("*/*")}


def assert_cache_verifies(cache: Path) -> int:
    """Every file in the cache is a complete block: its name is the SHA-256 of its bytes."""
    n = 0
    for name, p in cache_blocks(cache).items():
        assert not name.startswith("."), f"temporary file left in the cache: {p}"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == name, f"bad block in cache: {p}"
        n += 1
    return n


def image_digests(published: Published) -> set[str]:
    idx = load_index(published.mirror)
    return {idx.digest_hex(i) for i in range(idx.nblocks) if not idx.is_hole(i)}


def load_index(mirror: Path, version: int = 1) -> indexmod.Index:
    meta = json.loads((mirror / layout.meta_path(NAME, version)).read_bytes())
    return indexmod.decode((mirror / layout.index_path(NAME, meta["index"])).read_bytes())


# -- the basic path ----------------------------------------------------------------------------


def test_mount_loop_ext4_overlay_reads_the_tree(
    published: Published, nginx: Callable[..., Nginx], rig: Rig
) -> None:
    srv = nginx(published.mirror)
    cache = rig.tmp / "cache"
    m = rig.mount([srv.url], cache, "--prefetch", "off", pub=published.pub)
    assert m.disk.stat().st_size == published.image.stat().st_size
    loopdev, lower, merged = rig.ext4_overlay(m)
    assert tree_digests(merged) == published.digests
    # the overlay is writable, the image below is not
    (merged / "etc" / "hostname").write_text("changed\n")
    assert (merged / "etc" / "hostname").read_text() == "changed\n"
    assert (lower / "etc" / "hostname").read_text() == "seedboot-test\n"
    with pytest.raises(OSError), open(m.disk, "r+b"):
        pass
    # status says what happened
    out = seedboot("status", m.mountpoint).stdout
    assert f"{NAME} v1" in out and srv.url in out and "fetched on demand" in out
    st = m.status()
    c = st["counters"]
    assert isinstance(c, dict) and c["fetched"] + c["readahead"] > 0 and c["errors"] == 0
    # where its CPU went: starting up, the FUSE loop, and the threads that verified the fetches
    cpu = st["cpu"]
    assert isinstance(cpu, dict) and 0 < cpu["to_start"] <= cpu["total"]
    assert cpu["threads"]["main"] > 0 and "verify" in cpu["threads"] and "fetcher" in cpu["threads"]
    assert "s of it to start); threads: " in out and "main " in out.split("threads: ")[1]
    # busy: a loop device holds the image, so umount refuses with a clear message
    r = seedboot("umount", m.mountpoint, check=False)
    assert r.returncode == 1 and "busy" in r.stderr and "losetup -d" in r.stderr
    run("umount", merged)
    run("umount", lower)
    run("losetup", "-d", loopdev)
    clean_umount(m)
    # what was fetched is in the cache, verified, laid out like a mirror
    assert assert_cache_verifies(cache) > 0
    assert (cache / layout.latest_path(NAME)).read_text().strip() == "1"


def test_mount_refuses_bad_input(
    published: Published, nginx: Callable[..., Nginx], rig: Rig, tmp_path: Path
) -> None:
    srv = nginx(published.mirror)
    _, other_pub = keypair(tmp_path, "other")
    with pytest.raises(MountFailed, match=r"not trusted|no mirror delivered"):
        rig.mount([srv.url], tmp_path / "c1", pub=other_pub, check=False)
    with pytest.raises(MountFailed, match="no verified release"):
        rig.mount([], tmp_path / "c2", "--offline", pub=published.pub, check=False)
    assert not any(os.path.ismount(p) for p in tmp_path.glob("mnt*"))


# -- broken mirrors --------------------------------------------------------------------------


def _broken_copy(published: Published, dst: Path, how: str) -> list[str]:
    """A copy of the mirror with a few blocks damaged; returns their digests."""
    shutil.copytree(published.mirror, dst)
    victims = sorted(image_digests(published))[::7]
    for d in victims:
        p = dst / layout.block_path(d)
        data = bytearray(p.read_bytes())
        if how == "corrupt":
            data[len(data) // 2] ^= 0xFF
        else:
            del data[len(data) // 2 :]
        p.write_bytes(bytes(data))
    return victims


@pytest.mark.parametrize("how", ["dead", "http500", "corrupt", "truncated"])
def test_failover_reads_correct_data(
    published: Published, nginx: Callable[..., Nginx], rig: Rig, how: str
) -> None:
    good = nginx(published.mirror)
    victims: list[str] = []
    if how == "dead":
        bad_url = f"http://127.0.0.1:{free_port()}"
    elif how == "http500":
        bad_url = nginx(published.mirror, extra="location /blocks/ { return 500; }").url
    else:
        victims = _broken_copy(published, rig.tmp / "broken", how)
        bad_url = nginx(rig.tmp / "broken").url
    cache = rig.tmp / "cache"
    # --no-probe: the bad mirror first, so every block starts there
    m = rig.mount([bad_url, good.url], cache, "--no-probe", "--prefetch", "off", pub=published.pub)
    assert sha256_file(m.disk) == published.image_sha
    st = m.status()
    mirrors = st["mirrors"]
    assert isinstance(mirrors, list)
    by_url = {x["url"]: x for x in mirrors}
    assert by_url[bad_url]["errors"] > 0
    assert by_url[good.url]["fetched"] > 0
    clean_umount(m)
    log = m.log.read_text()
    if how in ("corrupt", "truncated"):
        assert "digest mismatch" in log or "index says" in log
        assert any(v in cache_blocks(cache) for v in victims)  # fetched again, from the good mirror
    assert assert_cache_verifies(cache) > 0


# -- offline, crashes, eviction -------------------------------------------------------------


def test_prefetch_all_then_offline(published: Published, nginx: Callable[..., Nginx], rig: Rig) -> None:
    srv = nginx(published.mirror)
    cache = rig.tmp / "cache"
    m = rig.mount([srv.url], cache, "--prefetch", "all", pub=published.pub)
    pf = m.wait_prefetch()
    assert pf["failed"] == 0
    clean_umount(m)
    assert set(cache_blocks(cache)) == image_digests(published)
    srv.stop()
    m2 = rig.mount([], cache, "--offline", pub=published.pub)
    assert_reads_match_image(m2, published)
    _, _, merged = rig.ext4_overlay(m2)
    assert tree_digests(merged) == published.digests
    assert m2.status()["offline"] is True


def assert_reads_match_image(m: Mount, published: Published) -> None:
    """Reads at any offset and size, across block edges and past the end, return exactly the
    image's bytes (a reply is stitched from slices of several blocks)."""
    bs = load_index(published.mirror).block_size
    image = published.image.read_bytes()
    size = len(image)
    cases = [(0, 1), (bs - 100, 200), (bs - 100, 2 * bs + 200), (3 * bs + 7, 5 * bs), (size - 1000, 5000)]
    fd = os.open(m.disk, os.O_RDONLY)
    try:
        for off, n in cases:
            assert os.pread(fd, n, off) == image[off : off + n], (off, n)
        assert os.pread(fd, 4096, size) == b""
    finally:
        os.close(fd)
    # many readers at once, O_DIRECT so that each read reaches the daemon as asked (no page
    # cache), replies of several blocks in flight together
    rng = random.Random(3)
    ranges = [
        (rng.randrange(0, size - 4 * bs) // 512 * 512, rng.randrange(1, 8) * bs // 2) for _ in range(64)
    ]

    def check(r: tuple[int, int]) -> bool:
        off, n = r
        buf = mmap.mmap(-1, n)  # page-aligned, as O_DIRECT wants
        dfd = os.open(m.disk, os.O_RDONLY | os.O_DIRECT)
        try:
            got = os.preadv(dfd, [buf], off)
            return buf[:got] == image[off : off + n]
        finally:
            os.close(dfd)
            buf.close()

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(check, ranges))


def _file_blocks(image: Path, path: str, block_size: int) -> set[int]:
    """Image blocks holding the data of ``path`` in the ext4 image (from debugfs)."""
    fs_block = int(
        next(
            ln for ln in run("tune2fs", "-l", image).stdout.splitlines() if ln.startswith("Block size:")
        ).split()[-1]
    )
    out = run("debugfs", "-R", f"blocks /{path}", image).stdout.split()
    return {int(b) * fs_block // block_size for b in out}


def test_partial_cache_offline(published: Published, nginx: Callable[..., Nginx], rig: Rig) -> None:
    srv = nginx(published.mirror)
    cache = rig.tmp / "cache"
    m = rig.mount([srv.url], cache, "--prefetch", "all", pub=published.pub)
    m.wait_prefetch()
    clean_umount(m)
    srv.stop()
    # make the cache partial: drop the blocks of text.txt (and nothing else uses them)
    idx = load_index(published.mirror)
    gone = _file_blocks(published.image, "text.txt", idx.block_size)
    gone_digests = {idx.digest_hex(b) for b in gone if not idx.is_hole(b)}
    for d in gone_digests:
        (cache / layout.block_path(d)).unlink()
    m2 = rig.mount([], cache, "--offline", pub=published.pub)
    _, _, merged = rig.ext4_overlay(m2)
    ok = 0
    for rel, digest in published.digests.items():
        blocks_of = _file_blocks(published.image, rel, idx.block_size)
        if any(idx.digest_hex(b) in gone_digests for b in blocks_of if not idx.is_hole(b)):
            continue
        assert sha256_file(merged / rel) == digest, rel
        ok += 1
    assert ok > 10
    with pytest.raises(OSError) as e:
        sha256_file(merged / "text.txt")
    assert e.value.errno == 5  # EIO
    log = m2.log.read_text()
    assert "is not in the cache and --offline is set" in log


def test_sigkill_during_prefetch_leaves_a_valid_cache(
    published: Published, nginx: Callable[..., Nginx], rig: Rig
) -> None:
    srv = nginx(published.mirror)
    cache = rig.tmp / "cache"
    host, port = srv.url.removeprefix("http://").split(":")
    # latency keeps the prefetch running long enough to be killed in the middle
    with LatencyProxy(upstream=(host, int(port)), rtt=0.05) as proxy:
        m = rig.mount([proxy.url], cache, "--prefetch", "all", "--conns", "4", pub=published.pub)
        deadline = time.monotonic() + 30
        while len(cache_blocks(cache)) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(m.pid, signal.SIGKILL)
        run("umount", "-l", m.mountpoint)
    have = len(cache_blocks(cache))
    assert 0 < have < len(image_digests(published)), "the kill did not land during prefetch"
    # restart: whatever the crash left is dropped or verified, and all of the image reads
    m2 = rig.mount([srv.url], cache, "--prefetch", "all", pub=published.pub)
    m2.wait_prefetch()
    assert sha256_file(m2.disk) == published.image_sha
    clean_umount(m2)
    assert assert_cache_verifies(cache) == len(image_digests(published))


def test_cache_limit_smaller_than_image(published: Published, nginx: Callable[..., Nginx], rig: Rig) -> None:
    srv = nginx(published.mirror)
    cache = rig.tmp / "cache"
    limit = 3 * 1024 * 1024
    stored = load_index(published.mirror).stored_bytes()
    assert stored > 2 * limit
    m = rig.mount([srv.url], cache, "--prefetch", "off", "--cache-max", "3M", pub=published.pub)
    _, _, merged = rig.ext4_overlay(m)
    assert tree_digests(merged) == published.digests
    st = m.wait_writes()
    cu = st["cache"]
    assert isinstance(cu, dict) and cu["evicted"] > 0
    assert cu["bytes"] <= limit + 2 * 256 * 1024
    size = sum(p.stat().st_size for p in cache_blocks(cache).values())
    assert size <= limit + 2 * 256 * 1024


# -- profiles --------------------------------------------------------------------------------


def test_record_merge_publish_prefetch_profile(
    published: Published, nginx: Callable[..., Nginx], rig: Rig, tmp_path: Path
) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(published.mirror, mirror)
    srv = nginx(mirror)
    traces = []
    for i in range(2):
        trace = tmp_path / f"trace{i}"
        m = rig.mount(
            [srv.url], tmp_path / f"c{i}", "--prefetch", "off", "--record", trace, pub=published.pub
        )
        dev, lower, merged = rig.ext4_overlay(m)
        assert (merged / "etc" / "hostname").read_text() == "seedboot-test\n"
        for p in sorted((merged / "dir" / "nested").iterdir())[: 10 + i]:
            p.read_bytes()
        run("umount", merged)
        run("umount", lower)
        run("losetup", "-d", dev)
        clean_umount(m)
        assert trace.read_text().startswith("# seedboot profile v1")
        traces.append(trace)
    out = tmp_path / "profile"
    seedboot("profile", "merge", *traces, "--out", out)
    profile_blocks = [int(ln.split()[0]) for ln in out.read_text().splitlines()[1:]]
    assert profile_blocks and 0 in profile_blocks, profile_blocks
    publish.publish(published.image, mirror, NAME, keys.load_secret_key(published.key), profile_file=out)
    idx = load_index(mirror, 2)
    want = {idx.digest_hex(b) for b in profile_blocks if not idx.is_hole(b)}
    # far from block 0 (which the mount's own first read and its read-ahead touch, a window of
    # 8 blocks with --conns 2), only the prefetch can have fetched a block
    far = {idx.digest_hex(b) for b in profile_blocks if b >= 32 and not idx.is_hole(b)}
    assert far
    cache = tmp_path / "cprof"
    m = rig.mount([srv.url], cache, "--prefetch", "profile", "--conns", "2", pub=published.pub)
    pf = m.wait_prefetch()
    assert pf["what"] == "profile" and pf["failed"] == 0
    assert want <= set(cache_blocks(cache))
    st = m.status()
    c = st["counters"]
    assert isinstance(c, dict) and c["prefetched"] >= len(far), st
    clean_umount(m)


# -- what the boot uses ----------------------------------------------------------------------


def test_boot_options_argv0_cached_release_and_rollback(
    published: Published, nginx: Callable[..., Nginx], rig: Rig, tmp_path: Path
) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(published.mirror, mirror)
    publish.publish(published.image, mirror, NAME, keys.load_secret_key(published.key))  # v2
    srv = nginx(mirror)
    cache = tmp_path / "cache"
    m = rig.mount([srv.url], cache, "--prefetch", "off", "--argv0", "@seedboot-blockdev", pub=published.pub)
    # systemd spares '@' processes at switch-root: it reads argv[0] from /proc/PID/cmdline
    assert Path(f"/proc/{m.pid}/cmdline").read_bytes().split(b"\0")[0] == b"@seedboot-blockdev"
    assert m.status()["version"] == 2
    clean_umount(m)
    # the boot's trust stage leaves the verified release in the cache: --cached-release takes
    # it from there (signature checked again) and only blocks come from the mirror
    (mirror / layout.latest_path(NAME)).write_text("1\n")  # a mirror replaying an old version
    before = len(srv.requests())
    m = rig.mount([srv.url], cache, "--cached-release", "--no-probe", "--prefetch", "off", pub=published.pub)
    assert m.status()["version"] == 2
    assert sha256_file(m.disk) == published.image_sha
    clean_umount(m)
    assert not [r for r in srv.requests()[before:] if "/meta/" in r or "/index/" in r]
    # from the mirror itself, the replayed older version is refused unless asked for
    with pytest.raises(MountFailed, match="older than version 2"):
        rig.mount([srv.url], cache, "--prefetch", "off", pub=published.pub, check=False)
    m = rig.mount([srv.url], cache, "--version", "1", "--prefetch", "off", pub=published.pub)
    assert m.status()["version"] == 1
    clean_umount(m)


# -- mirror choice ---------------------------------------------------------------------------


def test_probe_picks_the_fastest_mirror(published: Published, nginx: Callable[..., Nginx], rig: Rig) -> None:
    srv = nginx(published.mirror)
    host, port = srv.url.removeprefix("http://").split(":")
    with LatencyProxy(upstream=(host, int(port)), rtt=0.1) as slow:
        m = rig.mount([slow.url, srv.url], rig.tmp / "cache", "--prefetch", "off", pub=published.pub)
        with open(m.disk, "rb") as f:
            f.read(4 << 20)
        mirrors = m.status()["mirrors"]
        assert isinstance(mirrors, list)
        assert [x["url"] for x in mirrors] == [srv.url, slow.url]
        assert mirrors[0]["ttfb_ms"] < mirrors[1]["ttfb_ms"]
        assert mirrors[0]["fetched"] > 0 and mirrors[1]["fetched"] == 0
        out = seedboot("status", m.mountpoint).stdout
        assert f"mirror 1  in use {srv.url}" in out
        clean_umount(m)


def test_failed_mirror_is_retried_after_backoff(
    published: Published, nginx: Callable[..., Nginx], rig: Rig
) -> None:
    first, second = nginx(published.mirror), nginx(published.mirror)
    m = rig.mount(
        [first.url, second.url], rig.tmp / "cache", "--no-probe", "--prefetch", "off", pub=published.pub
    )
    first.stop()
    with open(m.disk, "rb") as f:
        f.seek(8 << 20)
        f.read(1 << 20)  # the first mirror fails, the second delivers
        st = m.mirrors()
        assert st[first.url]["errors"] > 0 and st[second.url]["fetched"] > 0
        first.start()
        time.sleep(4.5)  # longer than the backoff of a few failures (1 s, doubling)
        f.seek(32 << 20)
        f.read(4 << 20)
    st = m.mirrors()
    assert st[first.url]["fetched"] > 0, st
    clean_umount(m)


def test_sigterm_stops_the_daemon_only_when_nothing_uses_the_mount(
    published: Published, nginx: Callable[..., Nginx], rig: Rig
) -> None:
    """At shutdown everything gets SIGTERM; a daemon serving a mounted root must not go away."""
    srv = nginx(published.mirror)
    m = rig.mount([srv.url], rig.tmp / "cache", "--prefetch", "off", pub=published.pub)
    dev = rig.loop(m.disk)
    os.kill(m.pid, signal.SIGTERM)
    time.sleep(1)
    assert m.status()["pid"] == m.pid  # still serving
    assert "not stopping" in m.log.read_text()
    run("losetup", "-d", dev)
    os.kill(m.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and Path(f"/proc/{m.pid}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{m.pid}").exists() and not os.path.ismount(m.mountpoint)


def test_sigusr1_leaves_the_cache_file_system_clean_and_reads_go_on(
    published: Published, nginx: Callable[..., Nginx], rig: Rig
) -> None:
    """The miniroot's shutdown: the cache partition is never unmounted (it is out of the booted
    system's sight), so SIGUSR1 must stop the writes and leave its ext4 clean, no journal to
    replay at the next mount, while the root file system on top is still being read."""
    srv = nginx(published.mirror)
    part = rig.tmp / "part.ext4"
    run("mkfs.ext4", "-q", "-F", part, "64M")
    cache = rig.fs_mount("-o", "loop", part, rig.tmp / "knxblock")
    trace = cache / "boot.trace"
    m = rig.mount(
        [srv.url], cache, "--prefetch", "off", "--record", trace, "--quiesce-remount", pub=published.pub
    )
    size = published.image.stat().st_size
    with open(m.disk, "rb") as f:
        first = f.read(size // 2)
    m.wait_writes()
    cached = set(cache_blocks(cache))
    assert cached and fs_state(part) == "journal to replay"  # mounted and written: not clean yet
    # what the booted system's systemd does at shutdown: the unit's ExecStop (after systemd's
    # unescaping of $$) signals the daemon and waits for progress.json to say it is done
    install_unit(rig.tmp / "run", m.pid, m.mountpoint / "progress.json")
    unit_file = rig.tmp / "run/systemd/system" / UNIT
    unit = unit_file.read_text()
    if shutil.which("systemd-analyze"):  # systemd's own parser, where it is installed
        assert run("systemd-analyze", "verify", "--man=no", unit_file).returncode == 0
    stop = next(line.removeprefix("ExecStop=") for line in unit.splitlines() if line.startswith("ExecStop="))
    # a process of the booted system still writes a file on the partition: the remount waits
    # for it to be gone (tried again), the daemon's own writes stop at once
    straggler = open(cache / "straggler.log", "w")  # noqa: SIM115
    subprocess.run(shlex.split(stop.replace("$$", "$")), check=True, timeout=30)
    assert json.loads((m.mountpoint / "progress.json").read_bytes())["quiesced"], m.log.read_text()[-2000:]
    q = m.status()["quiesced"]
    assert isinstance(q, dict) and "busy" in q["cache"], q
    assert fs_state(part) == "journal to replay"
    straggler.close()
    deadline = time.monotonic() + 10
    while not (q := m.status()["quiesced"])["cache"].startswith("read-only"):  # type: ignore[index]
        assert time.monotonic() < deadline, q
        time.sleep(0.1)
    assert "cache read-only" in seedboot("status", m.mountpoint).stdout
    options = next(line.split()[3] for line in Path("/proc/mounts").read_text().splitlines()
                   if line.split()[1] == str(cache))  # fmt: skip
    assert options.split(",")[0] == "ro"
    assert fs_state(part) == "clean"
    assert trace.stat().st_size > 0  # the boot's trace was written before
    # the root file system on top goes on reading, blocks never cached included
    with open(m.disk, "rb") as f:
        whole = f.read()
    assert whole[: len(first)] == first
    assert hashlib.sha256(whole).hexdigest() == published.image_sha
    assert set(cache_blocks(cache)) == cached  # nothing written after the signal
    assert "no more writes" in m.log.read_text()
