"""The boot benchmark's workload, built once and cached under ``build/bench/``.

- ``rootfs/``: Debian 12 ``debootstrap --variant=minbase --include=systemd-sysv,udev`` with a
  unit ordered after ``multi-user.target`` that prints MARKER on the console and powers off.
- ``disk.img``: that tree as a 1 GiB ext4 image (``mke2fs -d``, fixed UUID and time).
- ``kernel/``: Debian's linux-image-amd64 (``seedboot kernel fetch``).
- ``baseline.img.zst``: a plain busybox initramfs that loads the virtio and ext4 modules,
  mounts ``/dev/vda`` and switch_roots into systemd: the local-disk baseline (a), and the same
  initramfs boots the peers, whose disk is the remote image behind QEMU's virtio disk.
A smoke workload (``smoke=True``) skips debootstrap: its "OS" is a busybox tree whose init
prints the marker, so the whole pipeline runs in seconds.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from seedboot.tools import kernel as kernel_mod

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "bench"
MARKER = "SEEDBOOT-BENCH-DONE"
SUITE = "bookworm"
IMAGE_SIZE = "1G"
UUID = "5eedb007-0000-4000-8000-000000000001"
# Modules the baseline initramfs loads, in dependency order (modprobe --show-depends adds the rest).
BASELINE_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")

MARKER_UNIT = f"""[Unit]
Description=seedboot benchmark: the boot is done
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'read up idle < /proc/uptime; echo {MARKER} guest-uptime=$$up > /dev/console'
ExecStartPost=/bin/systemctl --no-block poweroff

[Install]
WantedBy=multi-user.target
"""

BASELINE_INIT = """#!/bin/sh
# The baseline: local virtio disk, no network, straight into the OS.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do /bin/busybox insmod "$m" 2>/dev/null; done
echo "bench-init: modules loaded"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do /bin/busybox usleep 10000; i=$((i+1)); done
if ! /bin/busybox mount -t ext4 -o rw /dev/vda /newroot; then
  echo "bench-init: cannot mount /dev/vda"
  exec /bin/sh
fi
echo "bench-init: root mounted, switching"
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox umount /proc /sys
exec /bin/busybox switch_root /newroot /sbin/init
"""

SMOKE_INIT = f"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
read up idle < /proc/uptime
echo {MARKER} guest-uptime=$up > /dev/console
/bin/busybox poweroff -f
"""


@dataclass(frozen=True)
class Workload:
    image: Path
    kernel: kernel_mod.Kernel
    initrd: Path
    smoke: bool

    @property
    def size(self) -> int:
        return self.image.stat().st_size


def run(cmd: list[str], **kw: object) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def debian_mirror() -> str:
    """The Debian mirror apt already uses (the only one reachable here)."""
    for src in [*sorted(Path("/etc/apt/sources.list.d").glob("*.sources")), Path("/etc/apt/sources.list")]:
        if src.is_file():
            for uri in re.findall(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s*)?)(\S+)", src.read_text(), re.M):
                if "security" not in uri:
                    return str(uri)
    return "http://deb.debian.org/debian"


def build_rootfs(dest: Path) -> Path:
    if (dest / ".complete").exists():
        unit = dest / "etc/systemd/system/bench-marker.service"
        if unit.read_text() != MARKER_UNIT:  # built by an older harness: same OS, new marker
            unit.write_text(MARKER_UNIT)
            (dest / ".complete").touch()  # so the image is built (and published) again
        return dest
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is missing: run scripts/setup (or apt-get install debootstrap)")
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    log.info("debootstrap %s into %s (a few minutes)", SUITE, tmp)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=systemd-sysv,udev",
            SUITE,
            str(tmp),
            debian_mirror(),
        ]
    )
    unit = tmp / "etc/systemd/system/bench-marker.service"
    unit.write_text(MARKER_UNIT)
    wants = tmp / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "bench-marker.service").symlink_to("/etc/systemd/system/bench-marker.service")
    (tmp / "etc/hostname").write_text("bench\n")
    (tmp / "etc/fstab").write_text("# root is mounted by the initramfs\n")
    # A clean image: no downloaded packages, no machine-id (systemd makes one at boot).
    for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (tmp / "etc/machine-id").write_text("")
    (tmp / ".complete").touch()
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def build_image(rootfs: Path, image: Path, size: str = IMAGE_SIZE) -> Path:
    if image.exists() and image.stat().st_mtime >= (rootfs / ".complete").stat().st_mtime:
        return image
    tmp = image.with_name(image.name + ".tmp")
    fixed = ["-L", "benchroot", "-U", UUID, "-E", f"hash_seed={UUID}"]
    run(
        ["mke2fs", "-q", "-F", "-t", "ext4", *fixed, "-d", str(rootfs), str(tmp), size],
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    tmp.rename(image)
    return image


def module_files(kernel: kernel_mod.Kernel, names: tuple[str, ...]) -> list[Path]:
    """Module files for NAMES and their dependencies, in load order (built-ins left out)."""
    files: list[Path] = []
    for name in names:
        # One name per call: modprobe takes further arguments as module parameters.
        out = subprocess.run(
            ["modprobe", "-d", str(kernel.root), "-S", kernel.version, "--show-depends", name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            # modprobe prints paths under -d ROOT already; "builtin NAME" lines need nothing.
            if parts and parts[0] == "insmod" and Path(parts[1]) not in files:
                files.append(Path(parts[1]))
    return files


def build_initramfs(
    kernel: kernel_mod.Kernel, dest: Path, init_script: str, modules: tuple[str, ...]
) -> Path:
    stage = dest.with_name(dest.name + ".d")
    if stage.exists():
        shutil.rmtree(stage)
    for d in ("bin", "sbin", "proc", "sys", "dev", "newroot", "lib/modules"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", stage / "bin/busybox")
    for applet in ("sh", "cat", "echo", "mount", "umount", "insmod", "switch_root", "sleep", "usleep"):
        (stage / "bin" / applet).symlink_to("busybox")
    (stage / "sbin/modprobe").symlink_to("../bin/busybox")
    order = []
    for f in module_files(kernel, modules):
        target = stage / "lib/modules" / f.name
        shutil.copy2(f, target)
        order.append(f"/lib/modules/{f.name}")
    (stage / "modules.order").write_text("\n".join(order) + "\n")
    init = stage / "init"
    init.write_text(init_script)
    init.chmod(0o755)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as out:
        find = subprocess.Popen(["find", ".", "-print0"], cwd=stage, stdout=subprocess.PIPE)
        cpio = subprocess.Popen(
            ["cpio", "--null", "-o", "-H", "newc", "--quiet"],
            cwd=stage,
            stdin=find.stdout,
            stdout=subprocess.PIPE,
        )
        assert find.stdout is not None and cpio.stdout is not None
        find.stdout.close()
        subprocess.run(["zstd", "-q", "-19", "-c"], stdin=cpio.stdout, stdout=out, check=True)
        cpio.stdout.close()
        if cpio.wait() or find.wait():
            raise RuntimeError("building the initramfs cpio failed")
    tmp.rename(dest)
    shutil.rmtree(stage)
    return dest


def build_smoke_image(dest: Path) -> Path:
    """A 16 MiB ext4 'OS' whose /sbin/init prints the marker and powers off."""
    tree = dest.with_name("smoke-rootfs")
    if dest.exists() and (tree / "sbin/init").is_file() and (tree / "sbin/init").read_text() == SMOKE_INIT:
        return dest
    if tree.exists():
        shutil.rmtree(tree)
    for d in ("bin", "sbin", "proc", "dev"):
        (tree / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", tree / "bin/busybox")
    for applet in ("sh", "mount", "poweroff", "echo"):
        (tree / "bin" / applet).symlink_to("busybox")
    init = tree / "sbin/init"
    init.write_text(SMOKE_INIT)
    init.chmod(0o755)
    tmp = dest.with_name(dest.name + ".tmp")
    run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "benchroot", "-U", UUID, "-d", str(tree), str(tmp), "16M"],
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    tmp.rename(dest)
    shutil.rmtree(tree)
    return dest


def prepare(smoke: bool = False, build: Path = BUILD, kernel_dir: Path | None = None) -> Workload:
    """Build whatever is missing under BUILD and return the workload."""
    build.mkdir(parents=True, exist_ok=True)
    kernel = kernel_mod.fetch(kernel_dir or build / "kernel")
    if smoke:
        image = build_smoke_image(build / "smoke.img")
    else:
        image = build_image(build_rootfs(build / "rootfs"), build / "disk.img")
    initrd = build / f"baseline-{kernel.version}.img.zst"
    if not initrd.exists() or initrd.stat().st_mtime < Path(__file__).stat().st_mtime:
        build_initramfs(kernel, initrd, BASELINE_INIT, BASELINE_MODULES)
    return Workload(image=image, kernel=kernel, initrd=initrd, smoke=smoke)
