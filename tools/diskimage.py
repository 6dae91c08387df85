"""A seed disk as one sparse raw image, built without mounting anything.

    sector 0          MBR: GRUB's boot.img (first 440 bytes) and an msdos partition table
    sectors 1..2047   GRUB's i386-pc core.img (the post-MBR gap; no grub-install, which fails here)
    partition 1       /boot, ext2 (bootable): grub/grub.cfg, vmlinuz, initrd.img  (mke2fs -d)
    partition 2       ESP, FAT (type ef): EFI/BOOT/BOOTX64.EFI               (mkfs.vfat + mtools)
    partition 3       KNXBLOCK, ext4: the block cache, the rest of the disk   (mke2fs, lazy init)

Every filesystem is written straight into the image file at its offset, so the blocks never
written stay holes: a 16 GiB disk takes about the size of its kernel and miniroot.
Both GRUB images carry their modules and an early config that finds /boot by filesystem
UUID, so neither needs a module directory on the disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent.errors import SeedError

log = logging.getLogger(__name__)

SECTOR = 512
MiB = 1 << 20
BOOT_LABEL = "SEEDBOOT"
ESP_LABEL = "SEEDESP"
CACHE_LABEL = "KNXBLOCK"
MIN_CACHE = 32 * MiB

# What grub.cfg uses (grub/menu.py): menus, serial + screen, linux/initrd, search by UUID.
COMMON_MODULES = ("part_msdos", "ext2", "normal", "linux", "serial", "terminal", "echo", "test", "configfile",
                  "search", "search_fs_uuid", "sleep", "halt", "reboot", "gzio")  # fmt: skip
BIOS_MODULES = ("biosdisk", *COMMON_MODULES)
EFI_MODULES = ("fat", "efi_gop", "efi_uga", "all_video", *COMMON_MODULES)
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
    boot: Partition
    esp: Partition
    cache: Partition

    @property
    def partitions(self) -> tuple[Partition, Partition, Partition]:
        return (self.boot, self.esp, self.cache)


def _mib_up(n: int) -> int:
    return -(-n // MiB) * MiB


def plan(size: int, boot_bytes: int, esp_bytes: int) -> Layout:
    """Partitions for a disk of SIZE bytes: /boot and ESP just large enough, the cache the rest."""
    if size % MiB:
        raise SeedError(f"disk size {size} is not a whole number of MiB", "use e.g. --size 16G or 2048M")
    boot = Partition(BOOT_LABEL, MiB, _mib_up(boot_bytes), "83", bootable=True)
    esp = Partition(ESP_LABEL, boot.end, _mib_up(esp_bytes), "ef")
    cache = Partition(CACHE_LABEL, esp.end, size - esp.end, "83")
    if cache.size < MIN_CACHE:
        need = (esp.end + MIN_CACHE) // MiB
        raise SeedError(
            f"a {size // MiB} MiB disk leaves {cache.size // MiB} MiB for the cache",
            f"use --size of at least {need}M (16G is a sensible default)",
        )
    if size > 2**41 - MiB:
        raise SeedError(f"{size} bytes is beyond an MBR disk's 2 TiB", "use a smaller --size")
    return Layout(size, boot, esp, cache)


def sfdisk_script(layout: Layout) -> str:
    lines = ["label: dos", "unit: sectors", ""]
    for p in layout.partitions:
        boot = ", bootable" if p.bootable else ""
        lines.append(f"start={p.start // SECTOR}, size={p.size // SECTOR}, type={p.type}{boot}")
    return "\n".join(lines) + "\n"


def run(cmd: Sequence[str], stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    """Run a build tool; on failure raise a SeedError naming the command and its last words."""
    log.debug("run: %s", " ".join(cmd))
    try:
        p = subprocess.run(
            list(cmd),
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **(env or {})},
        )
    except FileNotFoundError as e:
        raise SeedError(f"{cmd[0]} is not installed", "run scripts/setup") from e
    except subprocess.CalledProcessError as e:
        tail = " / ".join((e.stderr or e.stdout or "").strip().splitlines()[-3:])
        raise SeedError(f"{' '.join(cmd[:3])} ... failed: {tail}") from e
    return p.stdout


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
    fallback = "(hd0,msdos1)/grub"
    run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_PC_DIR), "-c", str(cfg), "-p", fallback,
         "-o", str(core), *BIOS_MODULES])  # fmt: skip
    run(["grub-mkimage", "-O", "x86_64-efi", "-d", str(GRUB_EFI_DIR), "-c", str(cfg), "-p", fallback,
         "-o", str(efi), *EFI_MODULES])  # fmt: skip
    if core.stat().st_size > MiB - SECTOR:
        raise SeedError(f"GRUB core.img is {core.stat().st_size} bytes, more than the 1 MiB gap")
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
        ["mke2fs", "-q", "-F", "-t", "ext2", "-b", "1024", "-m", "0", "-N", "64", "-L", BOOT_LABEL,
         "-U", boot_uuid, "-d", str(boot_tree), "-E", f"offset={b.start},nodiscard",
         str(out), str(b.size // 1024)],
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


# Lazy inode table and journal init: mke2fs leaves them unwritten, so the file stays sparse.
CACHE_EXTENDED = "lazy_itable_init=1,lazy_journal_init=1,nodiscard,num_backup_sb=0"
CACHE_INODE_RATIO = 65536  # one inode per 64 KiB suits a cache of zstd blocks (about 64-256 KiB each)


def cache_mke2fs_args(size: int) -> list[str]:
    """mke2fs options that keep the cache filesystem's writes together at its start.

    Formats with 1-2 MiB allocation units (vdi, vhd, parallels) pay a whole unit for each
    scattered 4 KiB write, so: no backup superblocks and no resize inode (sparse_super2 with
    num_backup_sb=0: it is a cache, rebuilt if lost), no flex_bg (it would put the root
    directory after all the packed inode tables, 64 MiB in on 16 GiB), and the journal at
    1 MiB instead of mid-disk. What is left is the first ~1 MiB and the last group's bitmaps.
    """
    journal_mb = max(4, min(64, size // MiB // 64))
    return [
        "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-i", str(CACHE_INODE_RATIO), "-I", "256",
        "-L", CACHE_LABEL, "-O", "^flex_bg,sparse_super2,^resize_inode",
        "-J", f"size={journal_mb},location=1M",
    ]  # fmt: skip


def new_uuid() -> str:
    return str(uuid.uuid4())


def allocated(path: Path) -> int:
    """Bytes the file really takes on disk (holes excluded)."""
    return path.stat().st_blocks * 512


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def have_tools() -> list[str]:
    """The external tools this module needs that are missing on PATH."""
    need = ("grub-mkimage", "sfdisk", "mke2fs", "mkfs.vfat", "mmd", "mcopy", "qemu-img")
    return [t for t in need if shutil.which(t) is None]
