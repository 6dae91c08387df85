"""Stage 2: coldplug without a udev daemon, then wait (bounded) for network interfaces.

Every device the kernel found before we ran has a ``MODALIAS``; pyudev enumerates them from
/sys (libudev reads sysfs itself, no udevd), and one ``modprobe -a`` loads the drivers that
match. Drivers create new devices (virtio_pci makes virtio devices, whose own aliases pick
virtio_net and virtio_blk), so this repeats until no new alias shows up.
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
_VIRTUAL_NET = ("lo", "sit", "tunl", "ip6tnl", "gre", "dummy", "bond", "teql")
_VIRTUAL_BLOCK = ("loop", "ram", "zram", "nbd", "dm-", "md", "sr", "fd")


def modaliases_pyudev() -> set[str]:
    import pyudev

    found: set[str] = set()
    for dev in pyudev.Context().list_devices():
        alias = dev.properties.get("MODALIAS")
        if alias:
            found.add(alias)
    return found


def modaliases_sysfs(root: str = "/sys/devices") -> set[str]:
    """The same without libudev (a fallback, and what tests on any host can run)."""
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(root):
        if "modalias" in files:
            try:
                with open(os.path.join(dirpath, "modalias"), encoding="ascii", errors="replace") as f:
                    alias = f.read().strip()
            except OSError:
                continue
            if alias:
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
    scan: Callable[[], set[str]], load: Callable[[list[str]], None], rounds: int = ROUNDS
) -> tuple[int, int]:
    """Load drivers until the device set settles; returns (aliases seen, load rounds)."""
    done: set[str] = set()
    n = 0
    for n in range(1, rounds + 1):
        new = sorted(scan() - done)
        if not new:
            return len(done), n - 1
        load(new)
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


def run(ctx: Context) -> str:
    try:
        scan = modaliases_pyudev
        scan()
    except (ImportError, OSError) as e:
        log.warning("pyudev unavailable (%s); walking /sys instead", e)
        scan = modaliases_sysfs
    t0 = time.monotonic()
    seen, rounds = coldplug(scan, lambda names: modprobe(ctx, names))
    t1 = time.monotonic()
    modprobe(ctx, ALWAYS)
    log.debug(
        "coldplug %.2fs (scan with %s), fuse/loop/overlay/ext4 %.2fs",
        t1 - t0,
        scan.__name__,
        time.monotonic() - t1,
    )
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
