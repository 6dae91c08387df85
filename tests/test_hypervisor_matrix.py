"""Each seed disk format boots through its own GRUB (no -kernel) in QEMU with the hardware its
hypervisor usually presents, streams the demo root from nginx on loopback and reaches its marker.

The real VMware, VirtualBox, Hyper-V, Parallels and Xen cannot run on this machine; QEMU's
emulated devices of the same families stand in (tools/diskformats.py HARDWARE, README).
One boot is UEFI (OVMF, q35); one disk is booted again with no network device at all and must
reach the marker from what the first boot cached on its KNXBLOCK partition. Boots run one
after another (software emulation, 2 cores shared); all share one published mirror and one
set of disks built once.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from seedboot.grub import menu
from seedboot.tools import command, diskformats, diskimage, keys, mkseed, publish, vm
from tests import artifacts
from tests.helpers import Nginx

pytestmark = pytest.mark.qemu

MARKER = "SEEDBOOT-DEMO-OK"
MENU = r"Rescue shell: drivers"  # the last menu entry's title: GRUB has drawn the whole menu
AGENT_UP = r"seedboot: agent \S+ up"  # the miniroot's first line
BOOT_TIMEOUT = 420.0
DOWN = "\x1b[B"  # the down-arrow key as a VT100 terminal sends it (GRUB reads the serial port)
# What mkseed adds to the kernel and the miniroot in the worst format, vhd: GRUB, the ESP and the
# cache's metadata (~1.5 MB), in two runs each rounded out to 2 MiB allocation units. Whether
# a disk stays under 24 MB then depends on the miniroot (tests/test_mkseed.py checks the budget
# with a 10 MB one).
OVERHEAD = 7_000_000


LOGS = Path(__file__).resolve().parent.parent / "build" / "test-logs" / "hypervisor-matrix"


@dataclass
class Matrix:
    disks: Path
    nginx: Nginx
    kernel: Path
    initrd: Path
    work: Path

    def fresh(self, fmt: str, name: str) -> Path:
        """A copy of the pristine disk of FMT, for one test's boots (each boot writes its cache)."""
        src = self.disks / diskformats.FORMATS[fmt].filename
        dst = self.work / name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst) if fmt != "raw" else command.run(
            ["cp", "--sparse=always", str(src), str(dst)]
        )
        return dst


@pytest.fixture(scope="module")
def matrix() -> Iterator[Matrix]:
    # Under build/, not pytest's tmp: the console logs stay for a look after the run.
    work = LOGS
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key, pub = artifacts.signing_keypair()
    kernel = artifacts.kernel_dir()
    initrd = artifacts.initramfs([pub])
    # A smaller root than the boot tests' default: eight boots fetch it, in software emulation.
    root = artifacts.demo_root(size_mb=64, data_mb=16)
    mirror = work / "mirror"
    # Two versions: the menu then offers version 1 under "older signed versions" (rollback).
    for _ in range(2):
        publish.publish(root, mirror, "demo", keys.load_secret_key(key))
    srv = Nginx(root=mirror, workdir=work / "nginx").start()
    try:
        spec = mkseed.SeedSpec(
            mirrors=[f"http://10.0.2.2:{srv.port}"],
            names=["demo"],
            pubkeys=[pub],
            kernel=kernel,
            out=work / "disks",
            initrd=initrd,
            list_from=[str(mirror)],
            # A failed boot reboots, and -no-reboot turns that into QEMU exiting: no hang.
            append=["panic=-1", "seed.rescue=reboot"],
        )
        mkseed.build(spec)
        yield Matrix(work / "disks", srv, kernel / "vmlinuz", initrd, work)
    finally:
        srv.stop()


def _boot(m: Matrix, disk: Path, fmt: str, name: str, uefi: bool = False) -> vm.Machine:
    machine = vm.Machine(
        disk=disk, hardware=diskformats.HARDWARE[fmt], log=m.work / name / "console.log", uefi=uefi
    )
    with machine:
        machine.expect(MENU, timeout=180)
        machine.expect(AGENT_UP, timeout=BOOT_TIMEOUT)
        machine.expect(r"seedboot: cache\s+ok .*\(LABEL=KNXBLOCK\) on /knxblock", timeout=BOOT_TIMEOUT)
        machine.expect(MARKER, timeout=BOOT_TIMEOUT)
        machine.wait_exit(120)
    return machine


def _used(disk: Path, fmt: str) -> int:
    return diskimage.allocated(disk) if fmt == "raw" else disk.stat().st_size


def test_disk_sizes_follow_kernel_and_miniroot(matrix: Matrix) -> None:
    payload = matrix.kernel.stat().st_size + matrix.initrd.stat().st_size
    for fmt in diskformats.FORMATS:
        size = _used(matrix.disks / diskformats.FORMATS[fmt].filename, fmt)
        assert size < payload + OVERHEAD, (
            f"{fmt}: {size / 1e6:.1f} MB for {payload / 1e6:.1f} MB of kernel+miniroot"
        )
        # What the user downloads: the budget, in every format (vhd's 2 MiB and hdd's
        # 1 MiB allocation units make these the first to cross it).
        assert size < mkseed.MAX_DISK_BYTES, f"{fmt}: {size / 1e6:.2f} MB is over the 24 MB budget"


@pytest.mark.parametrize("fmt", ["vmdk", "vdi", "vhd", "hdd", "raw"])
def test_format_boots_with_its_hypervisor_hardware(matrix: Matrix, fmt: str) -> None:
    disk = matrix.fresh(fmt, f"bios-{fmt}")
    before = _used(disk, fmt)
    _boot(matrix, disk, fmt, f"bios-{fmt}")
    assert _used(disk, fmt) > before, "the blocks fetched were cached on the seed disk, which grew"


def test_uefi_boot(matrix: Matrix) -> None:
    disk = matrix.fresh("vdi", "uefi-vdi")
    m = _boot(matrix, disk, "vdi", "uefi-vdi", uefi=True)
    assert "BdsDxe" in m.console() or "UEFI" in m.console()  # OVMF's boot manager chose the disk


def test_qcow2_online_then_offline_from_its_cache(matrix: Matrix) -> None:
    disk = matrix.fresh("qcow2", "qcow2")
    _boot(matrix, disk, "qcow2", "qcow2")
    fetched = len(matrix.nginx.requests())
    # Same disk, no network device at all; the user presses 'o' (offline, from cache) in GRUB.
    log = matrix.work / "qcow2" / "offline.log"
    machine = vm.Machine(disk=disk, hardware=diskformats.HARDWARE["qcow2"], log=log, network=False)
    with machine:
        machine.expect(MENU, timeout=180)
        machine.send(menu.HOTKEY_OFFLINE)
        machine.expect(r"seedboot: demo, offline", timeout=60)
        machine.expect(r"seedboot: network", timeout=BOOT_TIMEOUT)
        machine.expect(MARKER, timeout=BOOT_TIMEOUT)
        machine.wait_exit(120)
    assert len(matrix.nginx.requests()) == fetched, "the offline boot asked the mirror for nothing"


def test_rollback_entry_boots_the_older_signed_version(matrix: Matrix) -> None:
    disk = matrix.fresh("raw", "rollback")
    log = matrix.work / "rollback" / "console.log"
    machine = vm.Machine(disk=disk, hardware=diskformats.HARDWARE["raw"], log=log)
    with machine:
        machine.expect(MENU, timeout=180)
        # As a user would: down past newest, offline and record to the submenu, open it, boot its first entry.
        machine.send(DOWN * 3 + "\r")
        machine.expect(r"demo version 1: roll back to it", timeout=60)
        machine.send("\r")
        machine.expect(r"seedboot: demo version 1 \(rollback\)", timeout=60)
        machine.expect(r"seedboot: trust\s+ok .*demo v1 verified", timeout=BOOT_TIMEOUT)
        machine.expect(MARKER, timeout=BOOT_TIMEOUT)
        machine.wait_exit(120)
