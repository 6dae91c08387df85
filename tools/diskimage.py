"""A seed disk as one sparse raw image, built without mounting anything.

    sector 0        MBR: GRUB's boot.img (first 440 bytes) and an msdos partition table
    sectors 1..     GRUB's i386-pc core.img (before the first partition; grub-install fails here)
    partition 1     KNXBLOCK, ext4: the block cache, nearly all of the disk    (mke2fs, lazy init)
    partition 2     /boot, ext2 (bootable): grub/grub.cfg, vmlinuz, initrd.img   (mke2fs -d)
    partition 3     ESP, FAT (type ef): EFI/BOOT/BOOTX64.EFI, just fitting it    (mkfs.vfat + mtools)
    (the few MiB past the ESP, less than one ext4 group, stay unpartitioned)

Every filesystem is written straight into the image file at its offset, and zero runs are
punched out afterwards, so the blocks never written stay holes: a 16 GiB disk takes about
the size of its kernel and miniroot. The order is chosen for the disk formats that allocate
1-2 MiB at a time (vdi, vhd, parallels): what is written sits in two runs, the MBR with the
cache's first blocks, and the cache's last block group (kept tiny) with /boot and the ESP.
Both GRUB images carry their modules and an early config that finds /boot by filesystem
UUID, so neither needs a module directory on the disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent.errors import SeedError
from seedboot.tools.command import run

log = logging.getLogger(__name__)

SECTOR = 512
KiB = 1 << 10
MiB = 1 << 20
BOOT_LABEL = "SEEDBOOT"
ESP_LABEL = "SEEDESP"
CACHE_LABEL = "KNXBLOCK"
MIN_CACHE = 32 * MiB
CACHE_BLOCK = 4096
CACHE_GROUP = 32768  # blocks per ext4 group at 4 KiB blocks
# The cache's last group is this many blocks: mke2fs writes that group's bitmaps even when
# lazy, so a small last group keeps them next to /boot. Below ~180 (its inode table plus 50)
# mke2fs drops the group and the previous one, 128 MiB away, becomes the last.
CACHE_TAIL_BLOCKS = 200

# What grub.cfg uses (grub/menu.py): menus, serial + screen, linux/initrd, search by UUID.
COMMON_MODULES = ("part_msdos", "ext2", "normal", "linux", "serial", "terminal", "echo", "test", "configfile",
                  "search", "search_fs_uuid", "sleep", "halt", "reboot")  # fmt: skip
BIOS_MODULES = ("biosdisk", *COMMON_MODULES)
EFI_MODULES = ("fat", "efi_gop", *COMMON_MODULES)
GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")


@dataclass(frozen=True)
class Partition:
    label: str
    start: int  # bytes from the start of the disk, 1 MiB aligned
    size: int  # bytes
    type: str  # MBR type for sfdisk
    bootable: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Layout:
    size: int
    cache: Partition
    boot: Partition
    esp: Partition

    @property
    def partitions(self) -> tuple[Partition, Partition, Partition]:
        """In disk order, which is also the table's numbering (cache 1, /boot 2, ESP 3)."""
        return (self.cache, self.boot, self.esp)


def _up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _mib_up(n: int) -> int:
    return _up(n, MiB)


def plan(size: int, boot_bytes: int, esp_bytes: int, core_bytes: int = 256 * KiB) -> Layout:
    """Partitions for a disk of SIZE bytes: the cache from right after GRUB's core.img, its
    size a whole number of ext4 groups plus a small last one; /boot and the ESP after it, the
    ESP taking what is left (less than 128 MiB, holes)."""
    if size % MiB:
        raise SeedError(f"disk size {size} is not a whole number of MiB", "use e.g. --size 16G or 2048M")
    if size > 2**41 - MiB:
        raise SeedError(f"{size} bytes is beyond an MBR disk's 2 TiB", "use a smaller --size")
    start = max(_up(SECTOR + core_bytes, 64 * KiB), 128 * KiB)
    boot_size = _up(boot_bytes, 64 * KiB)
    room = (size - start - boot_size - esp_bytes) // CACHE_BLOCK - CACHE_TAIL_BLOCKS
    groups = room // CACHE_GROUP
    cache_size = (groups * CACHE_GROUP + CACHE_TAIL_BLOCKS) * CACHE_BLOCK
    if groups < 1 or cache_size < MIN_CACHE:
        need = (start + boot_size + esp_bytes + MIN_CACHE + CACHE_GROUP * CACHE_BLOCK) // MiB + 1
        raise SeedError(
            f"a {size // MiB} MiB disk leaves no room for the cache after /boot and the ESP",
            f"use --size of at least {need}M (16G is a sensible default)",
        )
    cache = Partition(CACHE_LABEL, start, cache_size, "83")
    boot = Partition(BOOT_LABEL, cache.end, boot_size, "83", bootable=True)
    # The ESP just fits GRUB's image: a large FAT spreads its tables and clusters over more of
    # the disk, which costs whole 1-2 MiB allocation units in vdi/hdd/vhd files. The few MiB
    # left at the end of the disk stay unpartitioned.
    esp = Partition(ESP_LABEL, boot.end, _mib_up(esp_bytes), "ef")
    return Layout(size, cache, boot, esp)


def sfdisk_script(layout: Layout) -> str:
    lines = ["label: dos", "unit: sectors", ""]
    for p in layout.partitions:
        boot = ", bootable" if p.bootable else ""
        lines.append(f"start={p.start // SECTOR}, size={p.size // SECTOR}, type={p.type}{boot}")
    return "\n".join(lines) + "\n"


def replay_journal(image: Path) -> None:
    """Replay the ext4 journal of IMAGE, as its next mount would. A machine that powered off
    with the file system mounted (the miniroot's cache partition, unless the booted system's
    shutdown unit remounted it read-only) may hold its last metadata only in the journal,
    which debugfs does not read: a file written just before the power-off looks empty."""
    try:
        p = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(image)], capture_output=True, text=True)
    except FileNotFoundError as e:
        raise SeedError("e2fsck is not installed", "run scripts/setup") from e
    if p.returncode not in (0, 1):  # 1: the journal was replayed (e2fsck's "errors corrected")
        tail = " / ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise SeedError(f"cannot replay the journal of {image}: {tail}", "is it an ext4 file system image?")


def early_config(boot_uuid: str) -> str:
    """Embedded in both GRUB images: find /boot by UUID wherever the firmware numbered the disk."""
    return f"search --no-floppy --fs-uuid --set=root {boot_uuid}\nset prefix=($root)/grub\n"


def grub_images(workdir: Path, boot_uuid: str) -> tuple[Path, Path]:
    """core.img (BIOS) and BOOTX64.EFI (UEFI), each with its modules built in."""
    for d in (GRUB_PC_DIR, GRUB_EFI_DIR):
        if not d.is_dir():
            raise SeedError(
                f"GRUB modules missing: {d}", "run scripts/setup (grub-pc-bin, grub-efi-amd64-bin)"
            )
    cfg = workdir / "early.cfg"
    cfg.write_text(early_config(boot_uuid))
    core = workdir / "core.img"
    efi = workdir / "BOOTX64.EFI"
    # The -p prefix is a fallback for when the search finds nothing (it then names the first disk).
    fallback = "(hd0,msdos2)/grub"
    run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_PC_DIR), "-c", str(cfg), "-p", fallback,
         "-o", str(core), *BIOS_MODULES])  # fmt: skip
    run(["grub-mkimage", "-O", "x86_64-efi", "-d", str(GRUB_EFI_DIR), "-c", str(cfg), "-p", fallback,
         "-o", str(efi), *EFI_MODULES])  # fmt: skip
    if core.stat().st_size > 960 * KiB:
        raise SeedError(
            f"GRUB core.img is {core.stat().st_size} bytes; it must fit before the first partition"
        )
    return core, efi


def _dd(src: Path, dst: Path, seek_bytes: int, count: int | None = None) -> None:
    data = src.read_bytes()
    if count is not None:
        data = data[:count]
    with open(dst, "r+b") as f:
        f.seek(seek_bytes)
        f.write(data)


def write_image(
    out: Path,
    layout: Layout,
    boot_tree: Path,
    core_img: Path,
    efi_img: Path,
    boot_uuid: str,
) -> None:
    """Assemble the raw disk OUT (sparse) from the /boot tree and the two GRUB images."""
    if out.exists():
        out.unlink()
    with open(out, "wb") as f:
        f.truncate(layout.size)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(out)], stdin=sfdisk_script(layout))
    # boot.img's first 440 bytes: the table and signature after them stay sfdisk's.
    _dd(GRUB_PC_DIR / "boot.img", out, 0, count=440)
    _dd(core_img, out, SECTOR)
    fake_time = (
        {"E2FSPROGS_FAKE_TIME": os.environ.get("SOURCE_DATE_EPOCH", "")}
        if "SOURCE_DATE_EPOCH" in os.environ
        else {}
    )
    b = layout.boot
    run(
        ["mke2fs", "-q", "-F", "-t", "ext2", "-b", "4096", "-m", "0", "-N", "64", "-L", BOOT_LABEL,
         "-U", boot_uuid, "-d", str(boot_tree), "-E", f"offset={b.start},nodiscard",
         str(out), str(b.size // 4096)],
        env=fake_time,
    )  # fmt: skip
    e = layout.esp
    # mkfs.vfat sizes the FAT type from the whole file unless told: FAT12 suits a few MiB.
    fat = "12" if e.size <= 16 * MiB else "16"
    run(["mkfs.vfat", "-F", fat, "-n", ESP_LABEL, "-S", str(SECTOR), f"--offset={e.start // SECTOR}",
         str(out), str(e.size // 1024)])  # fmt: skip
    spec = f"{out}@@{e.start}"
    mt = {"MTOOLS_SKIP_CHECK": "1"}
    run(["mmd", "-i", spec, "::/EFI", "::/EFI/BOOT"], env=mt)
    run(["mcopy", "-i", spec, str(efi_img), "::/EFI/BOOT/BOOTX64.EFI"], env=mt)
    c = layout.cache
    run(["mke2fs", *cache_mke2fs_args(c.size), "-E", f"offset={c.start}," + CACHE_EXTENDED, str(out),
         str(c.size // 4096)], env=fake_time)  # fmt: skip
    if out.stat().st_size != layout.size:
        raise SeedError(f"{out} came out {out.stat().st_size} bytes, not {layout.size}")
    # mkfs.vfat and mke2fs write some all-zero blocks; as holes they cost nothing in any format.
    run(["fallocate", "--dig-holes", str(out)])


# Lazy inode table and journal init: mke2fs leaves them unwritten, so the file stays sparse.
CACHE_EXTENDED = "lazy_itable_init=1,lazy_journal_init=1,nodiscard,num_backup_sb=0"
CACHE_INODE_RATIO = 65536  # one inode per 64 KiB suits a cache of zstd blocks (about 64-256 KiB each)


def cache_mke2fs_args(size: int) -> list[str]:
    """mke2fs options that keep what the cache filesystem writes in its first ~600 KiB (plus
    its last group's bitmaps, which plan() puts next to /boot).

    Formats with 1-2 MiB allocation units (vdi, vhd, parallels) pay a whole unit for each
    scattered 4 KiB write, so: no backup superblocks and no resize inode (sparse_super2 with
    num_backup_sb=0: it is a cache, rebuilt if lost), no flex_bg (it would put the root
    directory after all the packed inode tables, 64 MiB in on 16 GiB, and write the bitmaps of
    every flex group), and the journal right after group 0's inode table instead of mid-disk.
    """
    blocks = size // CACHE_BLOCK
    groups = -(-blocks // CACHE_GROUP)
    gdt = -(-groups * 64 // CACHE_BLOCK)
    itable = CACHE_GROUP * CACHE_BLOCK // CACHE_INODE_RATIO * 256 // CACHE_BLOCK
    journal_at = 1 + gdt + 2 + itable + 16  # superblock, descriptors, bitmaps, inodes, root dirs
    journal_mb = max(4, min(64, size // MiB // 64))
    return [
        "-q", "-F", "-t", "ext4", "-b", str(CACHE_BLOCK), "-m", "0", "-i", str(CACHE_INODE_RATIO),
        "-I", "256", "-L", CACHE_LABEL, "-O", "^flex_bg,sparse_super2,^resize_inode",
        "-J", f"size={journal_mb},location={journal_at}",
    ]  # fmt: skip


def new_uuid() -> str:
    return str(uuid.uuid4())


def extract(img: Path, start: int, size: int, out: Path) -> Path:
    """Copy SIZE bytes at START of a sparse raw disk into OUT, data extents only (reading the
    holes of a 16 GiB disk would take a while)."""
    fd = os.open(img, os.O_RDONLY)
    try:
        with open(out, "wb") as f:
            f.truncate(size)
            off = start
            while off < start + size:
                try:
                    data = os.lseek(fd, off, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after OFF
                    break
                if data >= start + size:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), start + size)
                f.seek(data - start)
                f.write(os.pread(fd, hole - data, data))
                off = hole
    finally:
        os.close(fd)
    return out


def allocated(path: Path) -> int:
    """Bytes the file really takes on disk (holes excluded)."""
    return path.stat().st_blocks * 512


def ext2_bytes(root: Path) -> int:
    """A tight size for an ext2 filesystem (4 KiB blocks) holding ROOT: whole blocks per file,
    its indirect blocks (one per 1024 data blocks, plus the double-indirect ones), one block per
    directory, and superblock, descriptors, bitmaps and the 64-inode table."""
    data = 0
    for p in root.rglob("*"):
        if p.is_file():
            blocks = -(-p.stat().st_size // 4096)
            data += blocks + blocks // 1024 + 2
        elif p.is_dir():
            data += 1
    return (data + 32) * 4096 + 64 * 1024


def have_tools() -> list[str]:
    """The external tools this module needs that are missing on PATH."""
    need = ("grub-mkimage", "sfdisk", "mke2fs", "mkfs.vfat", "mmd", "mcopy", "qemu-img", "fallocate")
    return [t for t in need if shutil.which(t) is None]
