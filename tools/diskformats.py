"""The hypervisor disk formats a seed disk is converted to, and the QEMU hardware that stands in
for each hypervisor when it is booted here (tests, demo).

qemu-img skips zero runs when converting, so every format stays as small as the raw image's
written blocks. Each hypervisor profile lists QEMU devices close to what that hypervisor
presents to a guest by default; the real VMware, VirtualBox, Hyper-V, Parallels and Xen
cannot run on this machine (see README, "What was booted here").
"""

from __future__ import annotations

from dataclasses import dataclass

from seedboot.agent.errors import SeedError


@dataclass(frozen=True)
class DiskFormat:
    name: str  # the --formats word
    filename: str
    qemu_format: str  # qemu-img -O / QEMU -drive format=
    options: tuple[str, ...] = ()  # qemu-img -o
    hypervisor: str = ""


FORMATS: dict[str, DiskFormat] = {
    f.name: f
    for f in (
        DiskFormat("vmdk", "seed.vmdk", "vmdk", ("adapter_type=lsilogic",), "VMware"),
        DiskFormat("vdi", "seed.vdi", "vdi", (), "VirtualBox"),
        # force_size keeps the exact size instead of rounding it to a CHS geometry (Hyper-V and
        # Azure want that); dynamic: the file grows as blocks are written.
        DiskFormat(
            "vhd", "seed.vhd", "vpc", ("subformat=dynamic", "force_size=on"), "VirtualPC / Hyper-V gen 1"
        ),
        DiskFormat("hdd", "seed.hdd", "parallels", (), "Parallels"),
        DiskFormat("qcow2", "seed.qcow2", "qcow2", (), "QEMU/KVM"),
        DiskFormat("raw", "seed.img", "raw", (), "Xen HVM, dd to a USB stick"),
    )
}
DEFAULT_FORMATS = tuple(FORMATS)
ALL_FORMATS = (*DEFAULT_FORMATS, "ova")  # the OVA is an appliance around a vmdk, not a disk format


def parse_formats(text: str) -> tuple[str, ...]:
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if "all" in words:
        return ALL_FORMATS
    bad = [w for w in words if w not in FORMATS and w != "ova"]
    if bad or not words:
        raise SeedError(
            f"unknown disk format {', '.join(bad) or '(none)'}",
            f"choose from {','.join(FORMATS)},ova (or all)",
        )
    return tuple(dict.fromkeys(words))


@dataclass(frozen=True)
class Hardware:
    """QEMU devices standing in for one hypervisor's usual virtual hardware."""

    hypervisor: str
    format: str
    nic: str  # -device model
    disk: tuple[str, ...]  # QEMU arguments attaching the drive with id 'seed'
    machine: str = "pc"

    def describe(self) -> str:
        return f"{self.hypervisor}: {self.format}, NIC {self.nic}, disk {' '.join(self.disk)}"


# VMware's paravirtual SCSI (vmw_pvscsi), which SeaBIOS boots from too. QEMU's LSI 53C895A has no
# driver in the miniroot (sym53c8xx; VMware never presents that chip), and with its LSI SAS 1068
# (mptsas) the agent saw no disk within its wait: GRUB booted from both, Linux found no cache.
_PVSCSI = ("-device", "pvscsi,id=scsi0", "-device", "scsi-hd,drive=seed,bus=scsi0.0")
_AHCI = ("-device", "ahci,id=ahci0", "-device", "ide-hd,drive=seed,bus=ahci0.0")
_IDE = ("-device", "ide-hd,drive=seed,bus=ide.0")
HARDWARE: dict[str, Hardware] = {
    "vmdk": Hardware("VMware", "vmdk", "vmxnet3", _PVSCSI),
    "vdi": Hardware("VirtualBox", "vdi", "e1000", _AHCI),
    "vhd": Hardware("VirtualPC / Hyper-V gen 1", "vhd", "tulip", _IDE),
    "hdd": Hardware("Parallels", "hdd", "e1000", _AHCI),
    "qcow2": Hardware("QEMU/KVM", "qcow2", "virtio-net-pci", ("-device", "virtio-blk-pci,drive=seed")),
    "raw": Hardware("Xen HVM", "raw", "rtl8139", _IDE),
}
