"""The miniroot boots real kernels in QEMU (software emulation) into a root streamed from nginx.

Four boots share one published mirror and the cached kernel/initramfs/demo root artifacts:

1. online, fresh KNXBLOCK cache disk, ``seed.record``, with the seed disk's own hook and SSH
   keys: every stage prints its line, the demo root's marker appears (its init reads a large
   file after the switch: work goes on through the block daemon), the seed disk's hook ran,
   the shipped hook copied the SSH keys, the cache holds the release and a trace;
2. ``seed.offline`` with nginx stopped, the same cache disk: the marker again, from the cache,
   with the persistent overlay (``seed.overlay=persist``): the demo's write is on the disk;
3. the trace merged into a profile and published as version 2; a fresh cache and a static
   ``ip=`` with a host name: the profile is fetched and all its blocks are requested
   (download-ahead), the host name is in the new root's /etc/hostname;
4. a dead mirror and one whose release is signed by another key: the dead one is reported,
   the boot stops in the trust stage with the signature message, and reboots
   (``seed.rescue=reboot``: QEMU exits).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.seedboot_runs import fs_state
from seedboot.agent import layout
from seedboot.agent import profile as profilemod
from seedboot.agent.index import decode
from seedboot.tools import diskimage, keys, publish
from tests import artifacts
from tests.helpers import Nginx
from tests.qemu import Disk, Guest

pytestmark = pytest.mark.qemu

MARKER = r"SEEDBOOT-DEMO-OK sha256=ok overlay=ok"
BOOT_TIMEOUT = 300.0
STAGES = ("early", "hardware", "network", "cache", "mirror", "trust", "blockdev", "root")
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBootTestKey test@seedboot\n"
SEED_HOOK = """#!/bin/sh
# The seed disk's own hook: proves it ran (console), and with what environment.
echo "SEED-DISK-HOOK stage=$SEED_STAGE mirror=$SEED_MIRROR cache=$SEED_CACHE_KIND" > /dev/console
echo /root/.ssh/authorized_keys >> "$SEED_NEWROOT/etc/seedboot-demo/extra"
"""


@dataclass
class Setup:
    work: Path
    mirror: Path
    nginx: Nginx
    kernel: Path
    initrd: Path
    key: Path
    image: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("boot")
    key, pub = artifacts.signing_keypair("test")
    kernel = artifacts.kernel_dir() / "vmlinuz"
    initrd = artifacts.initramfs([pub])
    image = artifacts.demo_root(size_mb=48, data_mb=16)
    mirror = work / "mirror"
    # with dm-verity, as the publish command does by default (the local copy needs it)
    publish.publish(image, mirror, "demo", keys.load_secret_key(key), version=1, verity=True)
    nginx = Nginx(root=mirror, workdir=work / "nginx").start()
    yield Setup(work, mirror, nginx, kernel, initrd, key, image)
    nginx.stop()


def cache_disk(path: Path, files: dict[str, tuple[str, int]] | None = None) -> Path:
    """A raw disk holding an ext4 file system labelled KNXBLOCK, with FILES (path: (text, mode))."""
    tree = path.with_suffix(".tree")
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for rel, (text, mode) in (files or {}).items():
        p = tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(mode)
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "KNXBLOCK", "-d", str(tree), str(path), "160M"], check=True
    )
    return path


def debugfs(disk: Path, request: str) -> str:
    diskimage.replay_journal(disk)  # what the next boot's mount sees (the demo root powers off unmounted)
    p = subprocess.run(["debugfs", "-R", request, str(disk)], capture_output=True, text=True, check=True)
    return p.stdout


def read_file(disk: Path, path: str, out: Path) -> bytes:
    debugfs(disk, f"dump {path} {out}")
    return out.read_bytes()


def boot(s: Setup, name: str, append: str, disk: Path) -> Guest:
    return Guest(
        log=s.work / f"{name}.log",
        kernel=s.kernel,
        initrd=s.initrd,
        append=f"seed.name=demo seed.rescue=reboot {append}",
        disks=[Disk(disk)],
        watchdog=BOOT_TIMEOUT + 60,
    )


def stage_line(console: str, stage: str) -> str:
    m = re.search(rf"seedboot: {stage} +ok .*", console)
    assert m, f"no ok line for stage {stage}"
    return m.group(0)


def test_boot_online_offline_record_profile(setup: Setup) -> None:
    s = setup
    mirrors = f"seed.mirrors=http://10.0.2.2:{s.nginx.port}"
    disk = cache_disk(
        s.work / "cache1.img",
        {
            "hooks/pre-switch.d/60-seed-disk": (SEED_HOOK, 0o755),
            "ssh/authorized_keys": (SSH_KEY, 0o644),
        },
    )
    # 1: online, recording
    with boot(s, "online", f"{mirrors} seed.record", disk) as g:
        g.expect(MARKER, timeout=BOOT_TIMEOUT)
        g.wait_exit(60)
        console = g.console()
    # the demo root ran /run/seedboot/quiesce before its power-off: the daemon wrote what it
    # still held and left the partition clean, with no journal for the next mount to replay
    assert "at shutdown, run /run/seedboot/quiesce" in stage_line(console, "switch")
    assert fs_state(disk) == "clean"
    for stage in STAGES:
        stage_line(console, stage)
    assert re.search(r"seedboot: agent \S+ up at [\d.]+s \(kernel ran /init at [\d.]+s\)", console)
    assert "eth0 10.0.2.15/24 via DHCP" in stage_line(console, "network")
    assert "LABEL=KNXBLOCK" in stage_line(console, "cache")
    assert "demo v1 verified from http://10.0.2.2" in stage_line(console, "trust")
    # the root is mounted before much is read: little or nothing is in the local copy yet
    first_copy = re.search(
        r"; (\d+) of \d+ blocks \(\d+ MiB\) from the local copy", stage_line(console, "root")
    )
    first_copied = int(first_copy.group(1)) if first_copy else 0
    blockdev = stage_line(console, "blockdev")
    assert "keeping a local copy" in blockdev
    # after the switch the daemon goes on copying what the booted OS reads
    copying = re.search(r'seedboot-demo: local copy .*"blocks":(\d+)', console)
    assert copying and int(copying.group(1)) > first_copied, console[-3000:]
    pid = re.search(r"served by pid (\d+) \(@seedboot-blockdev, forked early\)", blockdev)
    assert pid, blockdev
    # the booted OS sees the daemon as a storage daemon (argv[0] "@..."), which systemd spares
    assert f"seedboot-demo: storage daemon @seedboot-blockdev pid {pid.group(1)}" in console
    assert re.search(r"timing: kernel ran /init at .* overhead \(all but the waits\) [\d.]+s", console)
    # where that overhead's CPU went: the forked daemon's imports and start are its own share
    split = re.search(
        r"CPU since the first line: agent ([\d.]+)s, its commands [\d.]+s, "
        r"block daemon ([\d.]+)s \(([^)]*)\), kernel and the rest [\d.]+s, idle [\d.]+s",
        console,
    )
    assert split and float(split.group(1)) > 0 and float(split.group(2)) > 0, console
    # the daemon's share by thread, from its status: its start (main) and its fetching
    threads = {n: float(v) for n, v in re.findall(r"([\w-]+) ([\d.]+)", split.group(3))}
    assert "main" in threads and "fetcher" in threads, split.group(0)
    assert sum(threads.values()) <= float(split.group(2)) + 0.01 * len(threads), split.group(0)
    assert f"SEED-DISK-HOOK stage=switch mirror=http://10.0.2.2:{s.nginx.port} cache=disk" in console
    # the cache partition now holds the verified release and this boot's trace
    assert debugfs(disk, "cat /demo/latest").strip() == "1"
    traces = re.findall(r"(demo-1-\S+\.trace)", debugfs(disk, "ls -p /traces"))
    assert len(traces) == 1, traces
    trace = profilemod.parse(read_file(disk, f"/traces/{traces[0]}", s.work / "trace"))
    assert len(trace) > 10
    assert "blocks" in debugfs(disk, "ls -p /")

    # 2: offline, nginx stopped: everything from the cache; writes persist on the cache disk
    s.nginx.stop()
    try:
        with boot(s, "offline", f"{mirrors} seed.offline seed.overlay=persist", disk) as g:
            g.expect(MARKER, timeout=BOOT_TIMEOUT)
            g.wait_exit(60)
            console = g.console()
    finally:
        s.nginx.start()
    assert "skipped: seed.offline" in stage_line(console, "network")
    assert "demo v1 verified from the cache" in stage_line(console, "trust")
    assert "offline" in stage_line(console, "blockdev")
    root = stage_line(console, "root")
    assert "overlay persistent on /knxblock/overlay/demo" in root
    # what the first boot read comes from the local copy, under dm-verity; the rest (the demo
    # init's large file) through the block daemon: the marker's checks passed over both
    copy = re.search(r"dm-verity /dev/dm-1 .*; (\d+) of (\d+) blocks \(\d+ MiB\) from the local copy", root)
    assert copy and first_copied < int(copy.group(1)) < int(copy.group(2)), root
    assert debugfs(disk, "cat /overlay/demo/upper/var/seedboot-demo-write").startswith("written by pid")

    # 3: the trace as a profile, published with version 2; a fresh cache prefetches it
    prof = s.work / "profile"
    prof.write_bytes(profilemod.encode(profilemod.merge([trace])))
    res = publish.publish(
        s.image, s.mirror, "demo", keys.load_secret_key(s.key), version=2, profile_file=prof, verity=True
    )
    digest = res.meta.profile
    assert digest is not None
    index = decode((s.mirror / layout.index_path("demo", res.meta.index)).read_bytes())
    before = len(s.nginx.requests())
    # also: a static address (the kernel's ip=) whose host name field the shipped hook writes
    static = "ip=10.0.2.15::10.0.2.2:255.255.255.0:seedbox:eth0:off"
    hostname_hook = '#!/bin/sh\necho "NEWROOT-HOSTNAME $(cat $SEED_NEWROOT/etc/hostname)" > /dev/console\n'
    disk3 = cache_disk(s.work / "cache3.img", {"hooks/pre-switch.d/60-show": (hostname_hook, 0o755)})
    with boot(s, "profile", f"{mirrors} {static}", disk3) as g:
        g.expect(MARKER, timeout=BOOT_TIMEOUT)
        console = g.console()
    assert "eth0 10.0.2.15/24 via static, gateway 10.0.2.2" in stage_line(console, "network")
    assert "NEWROOT-HOSTNAME seedbox" in console
    assert "demo v2 verified" in stage_line(console, "trust")
    # the root waited for the profile's blocks to reach the local copy: the boot reads them there
    profiled = re.search(
        r"from the local copy \S+ \(the profile's (\d+) blocks copied first", stage_line(console, "root")
    )
    assert profiled, stage_line(console, "root")
    reqs = s.nginx.requests()[before:]
    assert f"GET /{layout.profile_path('demo', digest)} HTTP/1.1" in reqs
    fetched = {r.split()[1].lstrip("/") for r in reqs if r.startswith("GET /blocks/")}
    wanted = {layout.block_path(index.digest_hex(b)) for b in trace if not index.is_hole(b)}
    assert wanted <= fetched, f"{len(wanted - fetched)} profile blocks never fetched"


def test_boot_refuses_release_signed_by_another_key(setup: Setup, tmp_path: Path) -> None:
    s = setup
    other_key = keys.write_keypair(tmp_path / "other")[0]
    bad = tmp_path / "bad-mirror"
    publish.publish(s.image, bad, "demo", keys.load_secret_key(other_key), version=1)
    nginx = Nginx(root=bad, workdir=tmp_path / "nginx").start()
    try:
        # a dead mirror first: it is listed as unreachable, the other one ranks first
        mirrors = f"seed.mirrors=http://10.0.2.2:9,http://10.0.2.2:{nginx.port}"
        with boot(s, "badsig", mirrors, cache_disk(tmp_path / "c.img")) as g:
            g.expect(r"seedboot: trust +FAILED", timeout=BOOT_TIMEOUT)
            g.expect(r"rebooting in \d+s", timeout=30)
            g.wait_exit(60)
            console = g.console()
    finally:
        nginx.stop()
    assert re.search(r"1 of 2 up: .*unreachable: http://10\.0\.2\.2:9", stage_line(console, "mirror"))
    line = re.search(r"seedboot: trust +FAILED.*", console)
    assert line and re.search(r"signature|not trusted|key", line.group(0), re.I), line
    assert "hint:" in console
    assert "SEEDBOOT-DEMO" not in console
