"""Stage 2: coldplug without a udev daemon, then wait (bounded) for network interfaces.

Every device the kernel found before we ran has a ``MODALIAS``; one ``modprobe -a`` loads
the drivers that match them all. Drivers create new devices (virtio_pci makes virtio
devices, whose own aliases pick virtio_net and virtio_blk), so this repeats until no new
alias shows up.

Storage drivers and the file systems load in a background thread while this stage waits for
a NIC and the network stage for DHCP: probing IDE/SATA ports waits on the (emulated) hardware,
0.3-1.5 s of module init under QEMU's emulation for ata_piix alone, and ext4 is the largest
module. The thread loads ext4 and the drivers of disks that need no port probing (virtio,
SCSI HBAs, Xen, Hyper-V) first, then the modules later stages need. The cache stage, the
first to need a disk, waits for the first group (``wait_quick``) and looks for its partition;
only if it is not there are the IDE/SATA drivers loaded (``settle(slow_storage=True)``).
Otherwise nothing in the miniroot needs them: the booted OS loads its own drivers for its
disks. (With no NIC to wait for, the cache stage had waited 0.85 s for the virtio disk
queued behind ata_piix and fuse; and on a virtio machine ata_piix, libata and scsi_mod were
loaded for an IDE controller with nothing on it.)

The aliases are the ``modalias`` files of the devices on each bus (/sys/bus/*/devices), what
libudev reads too. pyudev gives the same set (tests/test_stages.py checks that on the host)
but its import, libudev's loading and the per-device property parsing cost 0.7-2.5 s under
emulation; walking all of /sys/devices costs 0.8 s there, the bus directories 0.07 s.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from seedboot.agent.errors import SeedError
from seedboot.agent.stages import Context
from seedboot.agent.stages import syscalls as sc

log = logging.getLogger(__name__)

ROUNDS = 5
NIC_WAIT = 10.0
# Not tied to any device: what the later stages mount or attach. The cache stage mounts ext4
# and the block device stage mounts FUSE without waiting for the slow disk drivers; the root
# stage, which needs the others, waits for everything. ``crc32c`` (an alias: the generic code and
# the CPU's): mounting an ext4 with metadata checksums asks the crypto API for it, and when no
# module provides it yet the kernel spawns a modprobe of its own and waits for it, in the middle
# of the cache stage's mount (0.15 s under emulation).
QUICK_MODULES = ("ext4", "crc32c", "fuse")
# dm-verity (and dm-mod under it) for the root stage's device stack: loaded there, on its path,
# it cost two modprobe runs (0.1 s under emulation)
LATER_MODULES = ("loop", "overlay", "dm-verity")
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


# Aliases of disk controllers and disks: PCI mass storage (base class 01), virtio block and
# SCSI (device ids 2 and 8), SCSI devices, Xen and Hyper-V block front ends.
STORAGE = re.compile(
    r"^(pci:.*bc01sc|virtio:d0000000[28]v|scsi:|xen:vbd|"
    r"vmbus:(4acc9b2f6900f34ab76b6fd0be528cda|32264132cb86a2449b5c50d1417354f5|d96361baa104294db60572e2ffb1dc7f))"
)


# IDE (subclass 01) and SATA (06) controllers: libata probes and resets each port.
SLOW_STORAGE = re.compile(r"^pci:.*bc01sc0[16]")


def is_storage(alias: str) -> bool:
    return STORAGE.match(alias) is not None


def is_quick_storage(alias: str) -> bool:
    return is_storage(alias) and SLOW_STORAGE.match(alias) is None


def _read_alias(path: str) -> str | None:
    """The modalias in PATH ("" if empty or one of SKIP_ALIASES); None if there is no such file."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            alias = f.read().strip()
    except OSError:
        return None
    return "" if alias.startswith(SKIP_ALIASES) else alias


def _read_aliases(paths: Iterable[str]) -> set[str]:
    return {a for a in map(_read_alias, paths) if a}


# Buses whose devices never have a modalias file (no driver binds to them by alias; the CPUs'
# is /sys/devices/system/cpu/modalias): not listed at all.
NO_MODALIAS_BUSES = frozenset(
    (
        "cpu",
        "memory",
        "node",
        "clockevents",
        "clocksource",
        "event_source",
        "workqueue",
        "memory_tiering",
        "machinecheck",
        "container",
        "serial-base",
    )
)
# A device's modalias, by its entry in a bus's device list: (path, the entry's inode). A device
# that goes and comes back under the same name is a new sysfs entry, with another inode.
_known: dict[tuple[str, int], str] = {}
# Entries seen without a modalias file, and how often: the file may not be there yet (the
# kernel adds a device's attributes after its directory), so an entry counts as having none
# only once a second round finds it missing too.
_missing: dict[tuple[str, int], int] = {}


def modaliases_bus(root: str = "/sys") -> set[str]:
    """The ``modalias`` of every device on a bus, and of the CPUs (their features pick drivers).
    One directory listing per bus, no pattern matching: glob's took 0.19 s of PID 1's 1.5 s of
    CPU (profiled) in the three coldplug rounds of a boot under emulation. Each device's file is
    read once (``_known``), and a device without one is looked for twice (``_missing``): the
    later rounds read only the devices that appeared since. Profiled (cProfile) in a benchmark
    boot's four rounds: re-reading the ~55 devices without a modalias (ACPI nodes, memory
    blocks...) every round made 312 opens, 0.14 s of PID 1's CPU under emulation; now 85, 0.05 s."""
    found = _read_aliases([f"{root}/devices/system/cpu/modalias"])
    try:
        buses = os.listdir(f"{root}/bus")
    except OSError:
        buses = []
    for bus in buses:
        if bus in NO_MODALIAS_BUSES:
            continue
        devices = f"{root}/bus/{bus}/devices"
        try:
            with os.scandir(devices) as entries:
                for e in entries:
                    key = (f"{devices}/{e.name}/modalias", e.inode())
                    alias = _known.get(key)
                    if alias is None:
                        alias = _read_alias(key[0])
                        if alias is None:
                            _missing[key] = misses = _missing.get(key, 0) + 1
                            if misses < 2:
                                continue  # looked for again next round
                            alias = ""
                        _known[key] = alias
                    if alias:
                        found.add(alias)
        except OSError:
            continue
    return found


def modaliases_sysfs(root: str = "/sys/devices") -> set[str]:
    """Every ``modalias`` under /sys/devices: what the kernel asks drivers for (the reference
    the bus scan is tested against)."""
    return _read_aliases(
        os.path.join(dirpath, "modalias") for dirpath, _dirs, files in os.walk(root) if "modalias" in files
    )


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


@dataclass
class Coldplug:
    """Rounds of driver loading shared by this stage (everything but storage) and a background
    thread (storage and file systems); ``settle`` joins them and loads any stragglers."""

    scan: Callable[[], set[str]]
    load: Callable[[list[str]], None]
    done: set[str] = field(default_factory=set)
    rounds: int = 0
    background: threading.Thread | None = None
    quick: threading.Event = field(default_factory=threading.Event)  # set: the first group is loaded
    settled: bool = False  # everything but the slow storage drivers
    settled_slow: bool = False  # those too
    lock: threading.Lock = field(default_factory=threading.Lock)

    def round(self, want: Callable[[str], bool], extra: Iterable[str] = ()) -> int:
        """Load the drivers of the new aliases WANT accepts (and EXTRA); how many aliases."""
        with self.lock:
            new = sorted(a for a in self.scan() - self.done if want(a))
            self.done.update(new)
            if new or extra:
                self.rounds += 1
        if new or extra:
            self.load([*new, *extra])
        return len(new)

    def until_quiet(
        self, want: Callable[[str], bool], extra: Iterable[str] = (), rounds: int = ROUNDS
    ) -> None:
        first = list(extra)
        for _ in range(rounds):
            if not self.round(want, first) and not first:
                return
            first = []

    def start_background(self, quick: Iterable[str], later: Iterable[str]) -> None:
        """Load the quick storage drivers and QUICK, then LATER, in a thread."""
        first, then = list(quick), list(later)

        def run() -> None:
            try:
                self.until_quiet(is_quick_storage, first)
            finally:
                self.quick.set()
            self.until_quiet(is_quick_storage, then)

        self.background = threading.Thread(target=run, name="coldplug-storage", daemon=True)
        self.background.start()

    def wait_quick(self) -> float:
        """Wait until QUICK and the disks that need no port probing are there; seconds waited."""
        if self.background is None or self.settled:
            return 0.0
        t0 = time.monotonic()
        self.quick.wait()
        return time.monotonic() - t0

    def is_settled(self, slow_storage: bool) -> bool:
        return self.settled_slow or (self.settled and not slow_storage)

    def settle(self, slow_storage: bool = True) -> float:
        """Wait for the background loads, then load what any device still needs (with or
        without the IDE/SATA drivers); seconds waited."""
        if self.is_settled(slow_storage):
            return 0.0
        t0 = time.monotonic()
        if self.background is not None:
            self.background.join()
        self.until_quiet(lambda alias: slow_storage or SLOW_STORAGE.match(alias) is None)
        self.settled, self.settled_slow = True, self.settled_slow or slow_storage
        return time.monotonic() - t0


def settle(ctx: Context, slow_storage: bool = True) -> None:
    """Every driver loaded (the IDE/SATA ones only with SLOW_STORAGE) and the disks listed: for
    the stages that need a disk or a file system."""
    cp = ctx.coldplug
    if cp is None or cp.is_settled(slow_storage):
        return  # the cache and root stages both call this: only the first waits
    waited = cp.settle(slow_storage)
    ctx.disks = disks()
    if waited > 0.05:
        log.debug("storage drivers settled after %.2fs more; disks %s", waited, " ".join(ctx.disks))
    ctx.timings["storage-wait"] = waited


def wait_quick(ctx: Context) -> None:
    """ext4, fuse and the quick disk drivers loaded (see the module docstring): enough to
    look for the cache partition on virtio, SCSI, Xen and Hyper-V disks, and to mount FUSE."""
    if ctx.coldplug is not None:
        ctx.timings["storage-quick-wait"] = (
            ctx.timings.get("storage-quick-wait", 0.0) + ctx.coldplug.wait_quick()
        )


def modprobe(ctx: Context, names: Iterable[str]) -> None:
    names = list(names)
    if names:
        t0 = time.monotonic()
        # -b: honour blacklists for aliases too; -q: an alias no module claims is normal
        sc.run(
            [ctx.paths.modprobe, "-q", "-b", "-a", *names], timeout=60, what="loading drivers", check=False
        )
        log.debug("modprobe %d names in %.2fs: %s", len(names), time.monotonic() - t0, " ".join(names))


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
    if os.path.isdir("/sys/bus"):
        return modaliases_bus
    log.warning("no /sys/bus; asking libudev")
    return modaliases_pyudev


def run(ctx: Context) -> str:
    t0 = time.monotonic()
    scan = choose_scan()
    cp = Coldplug(scan, lambda names: modprobe(ctx, names))
    ctx.coldplug = cp
    not_storage = lambda alias: not is_storage(alias)  # noqa: E731
    cp.round(not_storage)  # buses (virtio_pci, hv_vmbus, ...) and NICs
    cp.start_background(QUICK_MODULES, LATER_MODULES)
    cp.until_quiet(not_storage)  # what the buses found: virtio_net, hv_netvsc, ...
    log.debug("coldplug %.2fs in the foreground (scan with %s)", time.monotonic() - t0, scan.__name__)
    need_net = not ctx.cmdline.offline and ctx.cmdline.ip.mode != "off"
    ctx.nics = wait_for("a network interface", nics, NIC_WAIT, ctx) if need_net else nics()
    if need_net and not ctx.nics:
        settle(ctx)  # a NIC behind a storage-class bus is unheard of, but cheap to rule out
        ctx.nics = nics()
    if need_net and not ctx.nics:
        raise SeedError(
            f"no network interface found after {NIC_WAIT:.0f}s "
            f"({len(cp.done)} devices, drivers loaded in {cp.rounds} rounds)",
            "this machine's network card needs a driver the miniroot lacks (see "
            "/sys/bus/pci/devices/*/modalias in the rescue shell), or boot with seed.offline",
        )
    return (
        f"{len(cp.done)} device aliases, {cp.rounds} driver rounds; "
        f"nics {' '.join(ctx.nics) or 'none'}; storage drivers loading in the background"
    )
