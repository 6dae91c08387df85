"""Stage 2: coldplug without a udev daemon, then wait (bounded) for network interfaces.

Every device the kernel found before we ran has a ``MODALIAS``; one ``modprobe -a`` loads
the drivers that match them all. Drivers create new devices (virtio_pci makes virtio
devices, whose own aliases pick virtio_net and virtio_blk), so this repeats until no new
alias shows up.

The aliases are read by walking /sys/devices for ``modalias`` files — what libudev itself
reads. pyudev gives the same set (tests/test_stages.py checks that on the host) but its
import, libudev's loading and the per-device property parsing cost 0.7-2.5 s under QEMU's
emulation against 0.4 s for the walk, so the walk is the default and pyudev the fallback.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable

from seedboot.agent.errors import SeedError
from seedboot.agent.stages import Context
from seedboot.agent.stages import syscalls as sc

log = logging.getLogger(__name__)

ROUNDS = 5
NIC_WAIT = 10.0
# Not tied to any device: what the later stages mount or attach.
ALWAYS = ("fuse", "loop", "overlay", "ext4")
# Devices no stage uses whose drivers probe slowly: CD-ROMs (sr_mod spins the drive up) and tapes.
SKIP_ALIASES = ("scsi:t-0x05", "scsi:t-0x01")
_VIRTUAL_NET = ("lo", "sit", "tunl", "ip6tnl", "gre", "dummy", "bond", "teql")
_VIRTUAL_BLOCK = ("loop", "ram", "zram", "nbd", "dm-", "md", "sr", "fd")


def modaliases_pyudev() -> set[str]:
    """The aliases as libudev enumerates them (same set as ``modaliases_sysfs``, slower)."""
    import pyudev

    found: set[str] = set()
    for dev in pyudev.Context().list_devices():
        alias = dev.properties.get("MODALIAS")
        if alias and not alias.startswith(SKIP_ALIASES):
            found.add(alias)
    return found


def modaliases_sysfs(root: str = "/sys/devices") -> set[str]:
    """Every ``modalias`` under /sys/devices: what the kernel asks drivers for."""
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(root):
        if "modalias" in files:
            try:
                with open(os.path.join(dirpath, "modalias"), encoding="ascii", errors="replace") as f:
                    alias = f.read().strip()
            except OSError:
                continue
            if alias and not alias.startswith(SKIP_ALIASES):
                found.add(alias)
    return found


def nics(sys_net: str = "/sys/class/net") -> list[str]:
    try:
        names = sorted(os.listdir(sys_net))
    except OSError:
        return []
    return [n for n in names if not n.startswith(_VIRTUAL_NET)]


def disks(sys_block: str = "/sys/block") -> list[str]:
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return []
    return [n for n in names if not n.startswith(_VIRTUAL_BLOCK)]


def coldplug(
    scan: Callable[[], set[str]],
    load: Callable[[list[str]], None],
    rounds: int = ROUNDS,
    extra: Iterable[str] = (),
) -> tuple[int, int]:
    """Load drivers until the device set settles; returns (aliases seen, load rounds).

    ``extra`` (modules no device asks for) goes with the first round: one modprobe less."""
    done: set[str] = set()
    first = list(extra)
    n = 0
    for n in range(1, rounds + 1):
        new = sorted(scan() - done)
        if not new and not first:
            return len(done), n - 1
        load(new + first)
        first = []
        done.update(new)
    return len(done), n


def modprobe(ctx: Context, names: Iterable[str]) -> None:
    names = list(names)
    if names:
        # -b: honour blacklists for aliases too; -q: an alias no module claims is normal
        sc.run(
            [ctx.paths.modprobe, "-q", "-b", "-a", *names], timeout=60, what="loading drivers", check=False
        )


def wait_for(what: str, probe: Callable[[], list[str]], limit: float, ctx: Context) -> list[str]:
    deadline = time.monotonic() + limit
    found = probe()
    if not found:
        ctx.console.waiting(what, limit)
    while not found and time.monotonic() < deadline:
        time.sleep(0.1)
        found = probe()
    return found


def choose_scan() -> Callable[[], set[str]]:
    if os.path.isdir("/sys/devices"):
        return modaliases_sysfs
    log.warning("no /sys/devices; asking libudev")
    return modaliases_pyudev


def run(ctx: Context) -> str:
    t0 = time.monotonic()
    scan = choose_scan()
    seen, rounds = coldplug(scan, lambda names: modprobe(ctx, names), extra=ALWAYS)
    log.debug("coldplug %.2fs (scan with %s)", time.monotonic() - t0, scan.__name__)
    need_net = not ctx.cmdline.offline and ctx.cmdline.ip.mode != "off"
    ctx.nics = wait_for("a network interface", nics, NIC_WAIT, ctx) if need_net else nics()
    ctx.disks = disks()
    if need_net and not ctx.nics:
        raise SeedError(
            f"no network interface found after {NIC_WAIT:.0f}s "
            f"({seen} devices, drivers loaded in {rounds} rounds)",
            "this machine's network card needs a driver the miniroot lacks (see "
            "/sys/bus/pci/devices/*/modalias in the rescue shell), or boot with seed.offline",
        )
    return (
        f"{seen} device aliases, {rounds} driver rounds; "
        f"nics {' '.join(ctx.nics) or 'none'}; disks {' '.join(ctx.disks) or 'none'}"
    )
