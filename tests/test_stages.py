"""The boot stages' logic on the host: leases, superblocks, coldplug rounds, loop devices,
the initramfs cleanup, the runner's failure lines, and mirror+trust against real nginx.

What needs PID 1 in a fresh machine (mounting /proc, switching root) is covered by the QEMU
boots in test_boot.py; here each piece runs against real files, mounts and servers.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from seedboot.agent import dhcp
from seedboot.agent.cmdline import Cmdline, parse
from seedboot.agent.console import Console
from seedboot.agent.errors import SeedError
from seedboot.agent.stages import (
    Context,
    Paths,
    cache,
    hardware,
    mirror,
    network,
    root,
    runner,
    switch,
    trust,
)
from seedboot.tools import keys, publish
from tests.helpers import Nginx, keypair


def test_lease_and_resolv_conf() -> None:
    # a server's ACK as it comes: the options the network stage uses, in the wire's layout
    options = {
        dhcp.OPT_SUBNET: bytes([255, 255, 255, 0]),
        dhcp.OPT_ROUTER: bytes([10, 0, 2, 2, 10, 0, 2, 3]),
        dhcp.OPT_DNS: bytes([10, 0, 2, 3, 1, 1, 1, 1]),
        dhcp.OPT_HOSTNAME: b"seedbox",
        dhcp.OPT_DOMAIN: b"example.org",
        dhcp.OPT_LEASE_TIME: (86400).to_bytes(4, "big"),
        dhcp.OPT_SERVER_ID: bytes([10, 0, 2, 2]),
    }
    ack = bytearray(dhcp.message(dhcp.ACK, 7, bytes(6), options))
    ack[0], ack[16:20] = 2, bytes([10, 0, 2, 15])  # op BOOTREPLY, yiaddr
    reply = dhcp.parse(bytes(ack))
    assert reply is not None and reply.kind == dhcp.ACK
    net = network.from_lease(dhcp.lease_of("eth0", reply))
    assert (net.address, net.gateway, net.dns, net.lease) == (
        "10.0.2.15/24",
        "10.0.2.2",
        ["10.0.2.3", "1.1.1.1"],
        86400,
    )
    assert (net.hostname, net.domain, net.how) == ("seedbox", "example.org", "DHCP")
    assert network.resolv_conf(net).splitlines()[1:] == [
        "search example.org",
        "nameserver 10.0.2.3",
        "nameserver 1.1.1.1",
    ]
    ack[ack.index(bytes([dhcp.OPT_SUBNET, 4, 255, 255, 255, 0])) + 3] = 0  # 255.0.255.0
    bad = dhcp.parse(bytes(ack))
    assert bad is not None
    with pytest.raises(ValueError, match=re.escape("eth1: '255.0.255.0' is not a netmask")):
        dhcp.lease_of("eth1", bad)


def ext4(path: Path, label: str, size: str = "4M") -> str:
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, str(path), size], check=True)
    out = subprocess.run(["blkid", "-s", "UUID", "-o", "value", str(path)], capture_output=True, text=True)
    return out.stdout.strip()


def test_cache_partition_found_by_label_uuid_or_path(tmp_path: Path) -> None:
    dev, sysblock = tmp_path / "dev", tmp_path / "sys-class-block"
    dev.mkdir()
    sysblock.mkdir()
    for name in ("vda", "vda1", "vda2", "loop0", "sr0"):
        (sysblock / name).mkdir()
    (dev / "vda").write_bytes(b"\0" * 8192)  # no file system
    ext4(dev / "vda1", "BOOT")
    uuid = ext4(dev / "vda2", "KNXBLOCK")
    ext4(dev / "loop0", "KNXBLOCK")  # loop devices are never the cache

    def find(spec: str) -> str | None:
        fs = cache.find(spec, dev_dir=str(dev), sys_class=str(sysblock))
        return Path(fs.device).name if fs else None

    assert find("LABEL=KNXBLOCK") == "vda2"
    assert find(f"UUID={uuid.upper()}") == "vda2"
    assert find("LABEL=BOOT") == "vda1"
    assert find("LABEL=NONE") is None
    fs = cache.read_ext(str(dev / "vda2"))
    assert fs is not None and (fs.label, fs.uuid) == ("KNXBLOCK", uuid)
    assert cache.read_ext(str(dev / "vda")) is None


def test_coldplug_loads_nics_first_and_storage_in_the_background() -> None:
    # virtio_pci (picked by the NIC's PCI alias) makes the virtio devices whose aliases pick
    # virtio_net and virtio_blk; the IDE controller's driver finds a disk (sd_mod).
    nic_pci = "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
    blk_pci = "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"
    ide = "pci:v00008086d00007010sv00001AF4sd00001100bc01sc01i80"
    world = {
        nic_pci: ["virtio:d00000001v00001AF4", "virtio:d00000002v00001AF4"],
        blk_pci: [],
        ide: ["scsi:t-0x00"],
        "acpi:PNP0501:": [],
        "virtio:d00000001v00001AF4": [],
        "virtio:d00000002v00001AF4": [],
        "scsi:t-0x00": [],
        "ext4": [],
        "fuse": [],
    }
    present = {nic_pci, blk_pci, ide, "acpi:PNP0501:"}
    loads: list[tuple[str, list[str]]] = []
    lock = threading.Lock()

    def load(names: list[str]) -> None:
        with lock:
            loads.append((threading.current_thread().name, names))
            for n in names:
                present.update(world[n])

    cp = hardware.Coldplug(lambda: set(present), load)
    not_storage = lambda a: not hardware.is_storage(a)  # noqa: E731
    cp.round(not_storage)
    assert loads == [("MainThread", ["acpi:PNP0501:", nic_pci])], "buses and NICs first, no storage"
    cp.start_background(["ext4"], ["fuse"])
    cp.until_quiet(not_storage)
    cp.wait_quick()
    with lock:
        quick = [n for _thread, names in loads for n in names]
    # the root stage, the cache partition found on the virtio disk: no IDE driver
    cp.settle(slow_storage=False)
    loaded = [n for _thread, names in loads for n in names]
    assert sorted(loaded) == sorted(set(world) - {ide, "scsi:t-0x00"}), "every driver once, none twice"
    assert cp.settle(slow_storage=False) == 0.0, "settling twice costs nothing"
    foreground = {n for thread, names in loads if thread == "MainThread" for n in names}
    assert "virtio:d00000001v00001AF4" in foreground
    background = [n for thread, names in loads if thread == "coldplug-storage" for n in names]
    assert {blk_pci, "fuse", "ext4"} <= set(background)
    # the cache stage looks for its partition once the virtio disk and ext4 are there
    assert {blk_pci, "virtio:d00000002v00001AF4", "ext4"} <= set(quick)
    # not found there (or no cache stage yet): the IDE controller's driver, then the disk behind it
    cp.settle()
    loaded = [n for _thread, names in loads for n in names]
    assert sorted(loaded) == sorted(world), "every driver once, none twice"
    assert loaded.index("scsi:t-0x00") > loaded.index(ide)
    assert cp.settle() == 0.0 and cp.settle(slow_storage=False) == 0.0


def test_bus_scan_matches_the_sysfs_walk() -> None:
    assert hardware.modaliases_bus() == hardware.modaliases_sysfs()


def test_bus_scan_reads_each_device_once_and_sees_new_ones(tmp_path: Path) -> None:
    """Later coldplug rounds read only the devices that appeared since (a sysfs tree of files
    stands in for /sys: the real one cannot be changed from here)."""
    devices = tmp_path / "bus" / "pci" / "devices"

    def device(name: str, alias: str | None) -> Path:
        d = devices / name
        d.mkdir(parents=True)
        if alias is not None:
            (d / "modalias").write_text(alias + "\n")
        return d

    nic = device("0000:00:03.0", "pci:v00001AF4d00001000")
    device("0000:00:04.0", None)  # no modalias yet
    assert hardware.modaliases_bus(str(tmp_path)) == {"pci:v00001AF4d00001000"}
    (nic / "modalias").write_text("pci:changed\n")  # the same entry is not read again
    (devices / "0000:00:04.0" / "modalias").write_text("pci:v00001AF4d00001001\n")
    device("0000:00:05.0", "pci:v00008086d0000100E")
    assert hardware.modaliases_bus(str(tmp_path)) == {
        "pci:v00001AF4d00001000",
        "pci:v00001AF4d00001001",
        "pci:v00008086d0000100E",
    }
    # a device that goes and comes back under the same name is a new entry: read again
    device("moved", "pci:v00001234d00001111").rename(tmp_path / "aside")
    nic.rename(tmp_path / "gone")
    (tmp_path / "aside").rename(nic)
    assert "pci:v00001234d00001111" in hardware.modaliases_bus(str(tmp_path))


def test_bus_scan_stops_looking_at_devices_without_a_modalias(tmp_path: Path) -> None:
    """A device found without a modalias in two rounds has none: the later rounds do not open
    it again (each open costs PID 1 ~0.5 ms under emulation); nor a skipped CD-ROM's, nor any
    device of a bus that never has one."""
    acpi = tmp_path / "bus" / "acpi" / "devices" / "device:00"
    acpi.mkdir(parents=True)
    cdrom = tmp_path / "bus" / "scsi" / "devices" / "1:0:0:0"
    cdrom.mkdir(parents=True)
    (cdrom / "modalias").write_text("scsi:t-0x05\n")
    memory = tmp_path / "bus" / "memory" / "devices" / "memory0"
    memory.mkdir(parents=True)
    (memory / "modalias").write_text("memory:stands-for-a-bus-without-aliases\n")
    assert hardware.modaliases_bus(str(tmp_path)) == set()
    assert hardware.modaliases_bus(str(tmp_path)) == set()
    (acpi / "modalias").write_text("acpi:LATE:\n")  # a kernel never does this: shows the limit
    (cdrom / "modalias").write_text("scsi:t-0x00\n")
    assert hardware.modaliases_bus(str(tmp_path)) == set()


def test_modaliases_sysfs_walk_matches_libudev() -> None:
    aliases = hardware.modaliases_sysfs()
    assert aliases and all(":" in a for a in aliases)
    assert aliases == hardware.modaliases_pyudev()
    assert "lo" not in hardware.nics()


@pytest.mark.root
def test_loop_device_read_only_with_direct_io(tmp_path: Path) -> None:
    img = tmp_path / "fs.img"
    ext4(img, "ROOT", "8M")
    dev, fd = root.attach_loop(img)
    try:
        name = Path(dev).name
        assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
        assert Path(f"/sys/block/{name}/loop/backing_file").read_text().strip() == str(img)
        assert root.fstype(dev) == "ext4"
    finally:
        os.close(fd)  # autoclear: the device detaches with its last user


@pytest.mark.root
def test_initramfs_cleanup_stays_on_its_file_system(tmp_path: Path) -> None:
    top = tmp_path / "rootfs"
    (top / "bin").mkdir(parents=True)
    (top / "bin" / "busybox").write_text("x")
    (top / "bin" / "sh").symlink_to("busybox")
    (top / "run").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(top / "run")], check=True)
    try:
        (top / "run" / "keep").write_text("runtime")
        removed = switch.delete_contents(str(top), os.stat(top).st_dev)
        assert removed == 3
        assert sorted(os.listdir(top)) == ["run"]
        assert (top / "run" / "keep").read_text() == "runtime"
    finally:
        subprocess.run(["umount", str(top / "run")], check=True)


def context(tmp_path: Path, cmdline: str, out: io.StringIO) -> Context:
    keysdir = tmp_path / "keys"
    keysdir.mkdir(exist_ok=True)
    paths = Paths(
        run=tmp_path / "run",
        keys=keysdir,
        hooks=tmp_path / "hooks",
        cache=tmp_path / "knxblock",
        shell="/nonexistent",
    )
    paths.cache.mkdir(exist_ok=True)
    ctx = Context(parse(cmdline), Console(out), paths=paths)
    ctx.cache_kind = "disk"
    return ctx


def test_failed_stage_prints_stage_cause_hint_then_rescue(tmp_path: Path) -> None:
    out = io.StringIO()
    ctx = context(tmp_path, "seed.rescue=reboot", out)
    hook = ctx.paths.hooks / "pre-mirror.d" / "10-note"
    hook.parent.mkdir(parents=True)
    hook.write_text(f"#!/bin/sh\necho $SEED_STAGE > {tmp_path}/hook-ran\n")
    hook.chmod(0o755)
    with pytest.raises(runner.RescueExit):
        runner.run_all(ctx, ("mirror",))
    text = out.getvalue()
    assert "seedboot: mirror    FAILED" in text
    assert "no image named on the kernel command line" in text
    assert "hint: add seed.name=NAME" in text
    assert (tmp_path / "hook-ran").read_text() == "mirror\n"


@pytest.fixture
def published(tmp_path: Path, nginx: Callable[..., Nginx]) -> tuple[Nginx, Path, Path]:
    """A small image published as 'demo' v1 and v2 on nginx; returns (server, key, pubkey)."""
    key, pub = keypair(tmp_path / "k")
    img = tmp_path / "img"
    img.write_bytes(os.urandom(1 << 20))
    mirror_dir = tmp_path / "mirror"
    for v in (1, 2):
        publish.publish(img, mirror_dir, "demo", keys.load_secret_key(key), version=v)
    return nginx(mirror_dir), key, pub


def test_mirror_and_trust_online_then_offline(tmp_path: Path, published: tuple[Nginx, Path, Path]) -> None:
    server, _key, pub = published
    out = io.StringIO()
    ctx = context(tmp_path, f"seed.name=demo seed.mirrors=http://127.0.0.1:1,{server.url}", out)
    (ctx.paths.keys / "test.pub").write_bytes(pub.read_bytes())
    assert "using " + server.url in mirror.run(ctx)
    assert ctx.mirrors[0] == server.url and "http://127.0.0.1:1" in ctx.mirror_errors
    line = trust.run(ctx)
    assert f"demo v2 verified from {server.url}" in line and "local clock" in line
    assert (ctx.paths.cache / "demo" / "latest").read_text().strip() == "2"
    # offline: the cache's copy, checked again
    off = context(tmp_path, "seed.name=demo seed.offline", io.StringIO())
    (off.paths.keys / "test.pub").write_bytes(pub.read_bytes())
    assert mirror.run(off) == "skipped: seed.offline"
    assert "demo v2 verified from the cache" in trust.run(off)
    # an older version only when asked for, and the console says so
    old = context(tmp_path, f"seed.name=demo seed.version=1 seed.mirrors={server.url}", io.StringIO())
    (old.paths.keys / "test.pub").write_bytes(pub.read_bytes())
    mirror.run(old)
    assert "older version 1" in trust.run(old)


def test_a_lone_mirror_is_asked_for_latest_once(tmp_path: Path, published: tuple[Nginx, Path, Path]) -> None:
    """Every request before the block device is a round trip the boot waits for (0.1 s each at
    100 ms): a lone mirror is probed once, and the trust stage starts from what it said."""
    server, _key, pub = published
    ctx = context(tmp_path, f"seed.name=demo seed.mirrors={server.url}", io.StringIO())
    (ctx.paths.keys / "test.pub").write_bytes(pub.read_bytes())
    mirror.run(ctx)
    assert "demo v2 verified" in trust.run(ctx)
    asked = [r.split()[1] for r in server.requests()]
    assert asked.count("/demo/latest") == 1, asked
    assert "/demo/meta/2.json" in asked


def test_trust_refuses_untrusted_key_and_empty_cache(
    tmp_path: Path, published: tuple[Nginx, Path, Path]
) -> None:
    server, _key, _pub = published
    _k2, other = keypair(tmp_path / "other")
    ctx = context(tmp_path, f"seed.name=demo seed.mirrors={server.url}", io.StringIO())
    (ctx.paths.keys / "other.pub").write_bytes(other.read_bytes())
    mirror.run(ctx)
    with pytest.raises(SeedError, match="not trusted"):
        trust.run(ctx)
    off = context(tmp_path, "seed.name=demo seed.offline", io.StringIO())
    (off.paths.keys / "other.pub").write_bytes(other.read_bytes())
    with pytest.raises(SeedError, match="holds no verified release") as e:
        trust.run(off)
    assert "boot once online" in e.value.hint


def test_no_mirror_reachable_lists_each_mirror(tmp_path: Path) -> None:
    ctx = context(
        tmp_path, "seed.name=demo seed.mirrors=http://127.0.0.1:1,http://127.0.0.1:2", io.StringIO()
    )
    with pytest.raises(SeedError) as e:
        mirror.run(ctx)
    assert "no mirror reachable" in e.value.message
    assert "http://127.0.0.1:1: " in e.value.message and "http://127.0.0.1:2: " in e.value.message


def test_context_hook_environment() -> None:
    ctx = Context(Cmdline(name="demo"), Console(io.StringIO()))
    env = ctx.hook_env("root")
    assert env["SEED_STAGE"] == "root" and env["SEED_NAME"] == "demo" and env["SEED_NEWROOT"] == "/newroot"


def test_console_lines_are_what_parsers_read(tmp_path: Path) -> None:
    from seedboot.agent import console

    line = console.stage_line(3.41, "network", "ok", 0.82, "eth0 10.0.2.15/24 via DHCP (lease 86400s)")
    assert line == "[   3.41s] seedboot: network   ok      0.82s  eth0 10.0.2.15/24 via DHCP (lease 86400s)"
    out = io.StringIO()
    c = Console(out)
    c.failure("mirror", 20.0, "no mirror reachable: http://a: timeout", "check seed.mirrors=")
    first, second = out.getvalue().splitlines()
    assert "seedboot: mirror    FAILED 20.00s  no mirror reachable" in first
    assert second.endswith("hint: check seed.mirrors=")
    active = tmp_path / "active"
    active.write_text("tty0 ttyS0\n")
    assert console.active_consoles(str(active)) == ["tty0", "ttyS0"]


def test_machine_cpu_counts_what_this_process_burns() -> None:
    """The timing line's CPU split rests on /proc/stat: the machine's busy time grows at
    least by what this process used (other jobs on the host only add to it)."""
    from seedboot.agent.procfs import machine_cpu

    busy0, idle0 = machine_cpu()
    cpu0 = time.process_time()
    while time.process_time() - cpu0 < 0.3:
        pass
    used = time.process_time() - cpu0
    busy1, idle1 = machine_cpu()
    assert busy1 - busy0 >= used - 0.05 and idle1 >= idle0


def test_switch_leaves_the_shutdown_hand_off_for_a_cache_partition(tmp_path: Path) -> None:
    """With a cache partition, /run/seedboot/quiesce for any init, and with systemd in the new
    root also the unit, in the /run the new root gets (the parent of /run/seedboot), enabled
    for this boot; both name the daemon's pid and progress file. With the cache in RAM,
    nothing."""
    from seedboot.agent.quiesce import SCRIPT, UNIT, stop_command

    ctx = context(tmp_path, "seed.name=demo", io.StringIO())
    ctx.paths = dataclasses.replace(ctx.paths, newroot=tmp_path / "newroot")
    ctx.daemon_pid = 4242
    units = tmp_path / "systemd" / "system"
    ctx.paths.run.mkdir(parents=True, exist_ok=True)
    script = ctx.paths.run / SCRIPT
    ctx.cache_kind = "ram"
    assert switch.clean_shutdown(ctx) == "" and not script.exists()
    ctx.cache_kind = "disk"
    # no systemd in the new root: only the script, which its shutdown may run
    assert switch.clean_shutdown(ctx) == f"; at shutdown, run {script} to leave the cache clean"
    assert not units.exists() and os.access(script, os.X_OK)
    assert stop_command(4242, ctx.paths.mountpoint / "progress.json") in script.read_text()
    (ctx.paths.newroot / "usr/lib/systemd").mkdir(parents=True)
    (ctx.paths.newroot / "usr/lib/systemd/systemd").write_text("")
    assert UNIT in switch.clean_shutdown(ctx)
    text = (units / UNIT).read_text()
    assert "kill -USR1 4242" in text and str(ctx.paths.mountpoint / "progress.json") in text
    assert (units / "sysinit.target.wants" / UNIT).resolve() == (units / UNIT).resolve()


def _udev_test(dev: str) -> str:
    """udevadm's dry run of the add event: the rules (system ones and /run/udev/rules.d)
    applied to a real device, its properties printed, nothing changed."""
    r = subprocess.run(
        ["udevadm", "test", "--action=add", f"/sys/block/{dev}"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


@pytest.mark.root
def test_switch_tells_the_booted_udev_to_leave_seedboot_loop_devices_unprobed(tmp_path: Path) -> None:
    """The rules file lands in the /run the new root gets, and the real udev rules, run by
    udevadm on real loop devices, skip the blkid probe of one backed by a file under the
    agent's run directory while still probing any other. (device-mapper cannot be loaded on
    this host, so the dm-name line is checked only as text.)"""
    ctx = context(tmp_path, "seed.name=demo", io.StringIO())
    switch.hide_own_devices(ctx)
    rules = tmp_path / "udev" / "rules.d" / switch.UDEV_RULES
    text = rules.read_text()
    assert 'ATTR{dm/name}=="seedroot|seedmix"' in text
    ours, other = ctx.paths.run / "img", tmp_path / "other.img"
    ctx.paths.run.mkdir(parents=True, exist_ok=True)
    for img in (ours, other):
        subprocess.run(["truncate", "-s", "8M", str(img)], check=True)
        subprocess.run(["mkfs.ext4", "-q", str(img)], check=True)
    system = Path("/run/udev/rules.d")
    made = not system.exists()
    system.mkdir(parents=True, exist_ok=True)
    installed = system / switch.UDEV_RULES
    loops = []
    try:
        for img in (ours, other):
            loops.append(
                subprocess.run(
                    ["losetup", "-f", "--show", "-r", str(img)], capture_output=True, text=True, check=True
                ).stdout.strip()
            )
        ours_dev, other_dev = (d.removeprefix("/dev/") for d in loops)
        assert "ID_FS_TYPE=ext4" in _udev_test(ours_dev)  # what the booted OS does without the rules
        installed.write_text(text)
        probed = _udev_test(ours_dev)
        assert "UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG=1" in probed and "ID_FS_TYPE" not in probed
        assert "ID_FS_TYPE=ext4" in _udev_test(other_dev)
    finally:
        for d in loops:
            subprocess.run(["losetup", "-d", d], check=False)
        installed.unlink(missing_ok=True)
        if made:
            subprocess.run(["rm", "-rf", "/run/udev"], check=False)
