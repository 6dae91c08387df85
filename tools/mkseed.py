"""Build seed disks: GRUB (BIOS and UEFI), a kernel, the miniroot and an empty KNXBLOCK cache,
in every hypervisor's disk format.

The GRUB menu lists the versions the mirror has when the disk is built; each is verified with
the trusted keys first (a version that does not verify would not boot, so it is not offered).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from seedboot.agent import layout as mlayout
from seedboot.agent import signature
from seedboot.agent.errors import SeedError
from seedboot.agent.reader import NotFound, Reader, open_reader
from seedboot.agent.release import latest_version, load_keys, open_release
from seedboot.grub import menu
from seedboot.tools import command, diskformats, diskimage

log = logging.getLogger(__name__)

MAX_DISK_BYTES = 24 * 1000 * 1000  # what a user downloads: VMSeed's disks were 31 to 102 MB
_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise SeedError(f"cannot read size {text!r}", "use e.g. 16G, 2048M or a number of bytes")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(m.group(1)) * mult


@dataclass
class SeedSpec:
    mirrors: list[str]
    names: list[str]
    pubkeys: list[Path]
    kernel: Path
    out: Path
    size: int = 16 << 30
    formats: tuple[str, ...] = diskformats.DEFAULT_FORMATS
    initrd: Path | None = None
    timeout: int = 3
    versions: int = 3  # how many older signed versions to offer for rollback
    list_from: list[str] = field(default_factory=list)  # where this machine reads the mirror
    append: list[str] = field(default_factory=list)
    default: str = ""


@dataclass
class SeedResult:
    out: Path
    files: dict[str, Path]
    menu: str
    boot_uuid: str
    layout: diskimage.Layout
    raw_allocated: int


class Progress:
    """One line per step with its time; steps are numbered so a user sees how far along it is."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.n = 0
        self.stream = stream if stream is not None else sys.stdout

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.n += 1
        print(f"[{self.n}/{self.total}] {what} ...", end="", flush=True, file=self.stream)
        t = time.monotonic()
        yield
        print(f" done ({time.monotonic() - t:.1f} s)", flush=True, file=self.stream)


def find_versions(sources: list[str], name: str, keys: list[signature.PublicKey], count: int) -> menu.Image:
    """The newest version of NAME and up to COUNT older ones that verify, from the first source
    that answers (a mirror URL or directory this machine can reach)."""
    errors: list[str] = []
    for src in sources:
        try:
            reader: Reader = open_reader(src)
            latest = latest_version(reader, name)
        except SeedError as e:
            errors.append(e.message)
            log.info("versions of %s: %s does not answer (%s)", name, src, e.message)
            continue
        # Raises if the newest version does not verify with these keys: the disk would not boot.
        open_release(reader, name, keys, latest)
        log.info("image %s: newest version %d on %s verifies", name, latest, src)
        older: list[menu.Version] = []
        v = latest - 1
        while v >= 1 and len(older) < count and latest - v <= count + 20:
            try:
                rel = open_release(reader, name, keys, v)
                older.append(menu.Version(v, rel.meta.created))
                log.info("image %s: version %d verifies, offered for rollback", name, v)
            except NotFound:
                log.debug("image %s: no version %d", name, v)
            except SeedError as e:
                log.info("image %s: version %d not offered: %s", name, v, e.message)
            v -= 1
        return menu.Image(name, latest, tuple(older))
    raise SeedError(
        f"cannot read image {name!r} from any mirror: {'; '.join(errors)}",
        "pass --list-from DIR-or-URL that this machine can reach, or --versions -1 to skip the lookup",
    )


def build_menu(spec: SeedSpec, keys: list[signature.PublicKey]) -> menu.MenuConfig:
    images: list[menu.Image] = []
    for name in spec.names:
        if spec.versions < 0:
            images.append(menu.Image(name))
        else:
            images.append(find_versions(spec.list_from or spec.mirrors, name, keys, spec.versions))
    cfg = menu.MenuConfig(
        images=tuple(images),
        mirrors=tuple(spec.mirrors),
        timeout=spec.timeout,
        default=spec.default,
        append=tuple(spec.append),
    )
    try:
        menu.render(cfg)
    except ValueError as e:
        raise SeedError(str(e), "--default takes one of the ids listed") from e
    return cfg


def build_initrd(spec: SeedSpec, workdir: Path) -> Path:
    """The miniroot from ``seedboot mkinitramfs`` (issue 4) with the trusted keys built in."""
    out = workdir / "initrd.img"
    cmd = [sys.executable, "-m", "seedboot.tools.cli", "mkinitramfs", "--kernel", str(spec.kernel)]
    for k in spec.pubkeys:
        cmd += ["--pubkey", str(k)]
    cmd += ["--out", str(out)]
    log.info("building the miniroot: %s", " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not out.is_file():
        tail = " / ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise SeedError(f"seedboot mkinitramfs failed: {tail}", "or pass a prebuilt miniroot with --initrd")
    return out


def check_inputs(spec: SeedSpec) -> None:
    if not spec.mirrors:
        raise SeedError("no mirror given", "pass --mirror URL (as the booting machine reaches it)")
    if not spec.names:
        raise SeedError("no image name given", "pass --name NAME")
    for n in spec.names:
        mlayout.check_name(n)
    for m in spec.mirrors:
        if "," in m or " " in m:
            raise SeedError(f"mirror URL {m!r} contains a comma or space", "pass one --mirror per URL")
    if not (spec.kernel / "vmlinuz").is_file():
        raise SeedError(f"no vmlinuz in {spec.kernel}", f"run: seedboot kernel fetch --out {spec.kernel}")
    if spec.initrd is not None and not spec.initrd.is_file():
        raise SeedError(f"miniroot {spec.initrd} does not exist", "build it with seedboot mkinitramfs")
    if spec.timeout < 0:
        raise SeedError("--timeout must be 0 or more seconds")
    missing = diskimage.have_tools()
    if missing:
        raise SeedError(f"missing tools: {', '.join(missing)}", "run scripts/setup")


def convert(raw: Path, fmt: diskformats.DiskFormat, out: Path) -> Path:
    dst = out / fmt.filename
    if dst.exists():
        dst.unlink()
    cmd = ["qemu-img", "convert", "-f", "raw", "-O", fmt.qemu_format]
    if fmt.options:
        cmd += ["-o", ",".join(fmt.options)]
    command.run([*cmd, str(raw), str(dst)])
    return dst


def build(spec: SeedSpec, stream: TextIO | None = None) -> SeedResult:
    check_inputs(spec)
    keys = load_keys(spec.pubkeys)
    formats = [f for f in spec.formats if f != "ova"]
    steps = 5 + len(formats) + (1 if "ova" in spec.formats else 0) + (0 if spec.initrd else 1)
    prog = Progress(steps, stream)
    spec.out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix=".mkseed-", dir=spec.out) as tmp_s:
        tmp = Path(tmp_s)
        with prog.step(f"GRUB menu: versions of {', '.join(spec.names)} verified with key(s) "
                       f"{', '.join(k.id_str for k in keys)}"):  # fmt: skip
            cfg = build_menu(spec, keys)
            text = menu.render(cfg)
        initrd = spec.initrd
        if initrd is None:
            with prog.step("miniroot (seedboot mkinitramfs)"):
                initrd = build_initrd(spec, tmp)
        tree = tmp / "boot"
        (tree / "grub").mkdir(parents=True)
        (tree / "keys").mkdir()
        (tree / "grub" / "grub.cfg").write_text(text)
        shutil.copyfile(spec.kernel / "vmlinuz", tree / "vmlinuz")
        shutil.copyfile(initrd, tree / "initrd.img")
        for k in spec.pubkeys:
            shutil.copyfile(k, tree / "keys" / k.name)
        kver = spec.kernel / "kernel-version"
        (tree / "seed.json").write_text(
            json.dumps(
                {
                    "mirrors": spec.mirrors,
                    "images": {i.name: i.latest for i in cfg.images},
                    "keys": [k.id_str for k in keys],
                    "kernel": kver.read_text().strip() if kver.is_file() else "",
                    "built": int(time.time()),
                    "entries": menu.entry_ids(cfg),
                },
                indent=1,
            )
            + "\n"
        )
        boot_uuid = diskimage.new_uuid()
        with prog.step("GRUB for BIOS (core.img) and UEFI (BOOTX64.EFI)"):
            core, efi = diskimage.grub_images(tmp, boot_uuid)
        # /boot just fits its files (its free space would cost allocation units); the ESP holds one
        # GRUB image and takes what is left at the end of the disk.
        lay = diskimage.plan(
            spec.size,
            diskimage.ext2_bytes(tree),
            efi.stat().st_size + 256 * 1024,
            core.stat().st_size,
        )
        raw = tmp / "seed.img"
        with prog.step(
            f"raw disk {spec.size / (1 << 30):.1f} GiB: KNXBLOCK cache {lay.cache.size >> 20} MiB, "
            f"/boot {lay.boot.size / (1 << 20):.1f} MiB, ESP {lay.esp.size / (1 << 20):.1f} MiB"
        ):
            diskimage.write_image(raw, lay, tree, core, efi, boot_uuid)
        raw_alloc = diskimage.allocated(raw)
        for name in formats:
            fmt = diskformats.FORMATS[name]
            with prog.step(f"{fmt.filename} ({fmt.hypervisor})"):
                if name == "raw":
                    dst = spec.out / fmt.filename
                    command.run(["cp", "--sparse=always", str(raw), str(dst)])
                    files[name] = dst
                else:
                    files[name] = convert(raw, fmt, spec.out)
        if "ova" in spec.formats:
            from seedboot.tools import ova

            with prog.step("seed.ova (OVF + stream-optimized vmdk, for VirtualBox and VMware import)"):
                files["ova"] = ova.write_ova(raw, spec.out / "seed.ova", spec.size, tmp)
        with prog.step("checking sizes"):
            for name, p in files.items():
                size = diskimage.allocated(p) if name == "raw" else p.stat().st_size
                if size > MAX_DISK_BYTES:
                    log.warning(
                        "%s is %.1f MB, over the %d MB budget", p, size / 1e6, MAX_DISK_BYTES // 10**6
                    )
    return SeedResult(spec.out, files, text, boot_uuid, lay, raw_alloc)


def summary(res: SeedResult) -> str:
    lines = ["", f"seed disks in {res.out} (virtual size {res.layout.size / (1 << 30):.1f} GiB):"]
    for name, p in res.files.items():
        hv = (
            diskformats.FORMATS[name].hypervisor
            if name in diskformats.FORMATS
            else "VirtualBox / VMware import"
        )
        size = p.stat().st_size
        alloc = diskimage.allocated(p)
        note = f"{size / 1e6:6.1f} MB" if name != "raw" else f"{alloc / 1e6:6.1f} MB on disk (sparse)"
        flag = "" if min(size, alloc) <= MAX_DISK_BYTES else "  OVER 24 MB"
        lines.append(f"  {p.name:11} {note}  {hv}{flag}")
    lines.append("GRUB menu entries: " + ", ".join(_entry_ids(res.menu)))
    return "\n".join(lines)


def _entry_ids(text: str) -> list[str]:
    return re.findall(r"--id (\S+)", text)
