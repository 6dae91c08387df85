"""The miniroot's build: kernel fetch, initramfs contents, the frozen agent, the demo root, and boots."""

from __future__ import annotations

import hashlib
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from seedboot.agent.errors import SeedError
from seedboot.tools import cpio, demoroot, mkinitramfs
from tests import artifacts
from tests.helpers import Nginx
from tests.qemu import Disk, Guest

# The seed disk (under 24 MB with the 8.2 MB kernel) needs the miniroot near 10 MB: it is ~10.6 MB
# (libcrypto, libpython and the kernel modules are most of it). This ceiling catches regressions.
SIZE_CEILING = 11_500_000
SIZE_TARGET = 10 * 1000 * 1000
SEEDBOOT = [sys.executable, "-m", "seedboot.tools.cli"]

DISK_MODULES = [
    "ata_piix", "ahci", "sd_mod", "sr_mod", "mptspi", "mptsas", "vmw_pvscsi", "hv_storvsc",
    "hv_vmbus", "xen-blkfront", "virtio_blk", "virtio_scsi", "virtio_pci", "nvme", "BusLogic",
]  # fmt: skip
NIC_MODULES = [
    "e1000", "e1000e", "vmxnet3", "pcnet32", "tulip", "8139too", "8139cp", "ne2k-pci",
    "virtio_net", "hv_netvsc", "xen-netfront",
]  # fmt: skip
FS_MODULES = ["fuse", "loop", "overlay", "ext4", "crc32c_generic", "dm-mod", "dm-verity"]


def ko_names(entries: dict[str, cpio.Entry]) -> set[str]:
    return {Path(n).name.removesuffix(".ko").replace("-", "_") for n in entries if n.endswith(".ko")}


@pytest.fixture(scope="module")
def pubkey() -> Path:
    return artifacts.signing_keypair()[1]


@pytest.fixture(scope="module")
def image(pubkey: Path) -> Path:
    return artifacts.initramfs([pubkey])


@pytest.fixture(scope="module")
def entries(image: Path) -> dict[str, cpio.Entry]:
    raw = image.read_bytes()
    assert raw[:4] == b"\x28\xb5\x2f\xfd", "not a zstd frame"
    return cpio.read_names(zstandard.ZstdDecompressor().decompressobj().decompress(raw))


@pytest.fixture(scope="module")
def extracted(entries: dict[str, cpio.Entry], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The initramfs unpacked on the host (files and symlinks; device nodes skipped)."""
    root = tmp_path_factory.mktemp("initramfs")
    for name, e in sorted(entries.items()):
        p = root / name
        if stat.S_ISDIR(e.mode):
            p.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(e.mode):
            p.symlink_to(e.data.decode())
        elif stat.S_ISREG(e.mode):
            p.write_bytes(e.data)
            p.chmod(stat.S_IMODE(e.mode))
    return root


def test_kernel_fetch_leaves_vmlinuz_and_depmod_output() -> None:
    k = artifacts.kernel_dir()
    version = (k / "kernel-version").read_text().strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-amd64", version)
    assert (k / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS", "vmlinuz is not a bzImage"
    dep = (k / "lib" / "modules" / version / "modules.dep").read_text()
    assert "kernel/fs/fuse/fuse.ko:" in dep


def test_kernel_fetch_is_cached(tmp_path: Path) -> None:
    k = artifacts.kernel_dir()
    before = (k / "vmlinuz").stat().st_mtime_ns
    out = subprocess.run(
        [*SEEDBOOT, "kernel", "fetch", "--out", str(k)],
        capture_output=True, text=True, check=True, cwd=artifacts.REPO,
    )  # fmt: skip
    assert "kernel 6." in out.stdout
    assert (k / "vmlinuz").stat().st_mtime_ns == before


def test_initramfs_is_small_zstd_with_boot_essentials(image: Path, entries: dict[str, cpio.Entry]) -> None:
    size = image.stat().st_size
    print(f"initramfs {size / 1e6:.2f} MB (target {SIZE_TARGET / 1e6:.0f} MB)")
    assert size <= SIZE_CEILING
    assert stat.S_ISREG(entries["init"].mode) and entries["init"].mode & 0o111
    assert entries["init"].data.startswith(b"#!/bin/busybox sh")
    assert b"ELF" in entries["bin/busybox"].data[:4]
    for applet in ("bin/sh", "sbin/modprobe", "sbin/switch_root", "bin/mount", "sbin/udhcpc"):
        assert stat.S_ISLNK(entries[applet].mode), applet
    assert stat.S_ISCHR(entries["dev/console"].mode) and entries["dev/console"].rdev == (5, 1)
    release = entries["etc/initrd-release"].data.decode()
    assert "ID=seedboot" in release and "SEEDBOOT_KERNEL=" in release


def test_initramfs_trusts_exactly_the_given_keys(pubkey: Path, entries: dict[str, cpio.Entry]) -> None:
    keys = {n: e for n, e in entries.items() if n.startswith("etc/seedboot/keys/") and stat.S_ISREG(e.mode)}
    assert keys == {f"etc/seedboot/keys/{pubkey.name}": keys[f"etc/seedboot/keys/{pubkey.name}"]}
    assert keys[f"etc/seedboot/keys/{pubkey.name}"].data == pubkey.read_bytes()


def test_initramfs_has_hypervisor_disk_nic_and_fs_modules(entries: dict[str, cpio.Entry]) -> None:
    have = ko_names(entries)
    want = {m.replace("-", "_") for m in DISK_MODULES + NIC_MODULES + FS_MODULES}
    assert want <= have, f"missing: {sorted(want - have)}"
    # Dependencies come along from modules.dep: ext4 needs jbd2 and mbcache, ata_piix libata, sd_mod scsi_mod.
    assert {"jbd2", "mbcache", "libata", "scsi_mod"} <= have
    version = entries["etc/initrd-release"].data.decode().split("SEEDBOOT_KERNEL=")[1].split()[0]
    dep = entries[f"lib/modules/{version}/modules.dep"].data.decode()
    assert re.search(r"^kernel/fs/ext4/ext4\.ko:.*jbd2\.ko", dep, re.MULTILINE)
    assert f"lib/modules/{version}/modules.alias" in entries


def test_every_module_the_agent_names_is_in_the_initramfs(entries: dict[str, cpio.Entry]) -> None:
    """What coldplug asks modprobe for by name (a module or an alias such as crc32c) resolves
    to a module in the initramfs: a miss would only show as a slower boot."""
    from seedboot.agent.stages.hardware import LATER_MODULES, QUICK_MODULES

    have = ko_names(entries)
    version = entries["etc/initrd-release"].data.decode().split("SEEDBOOT_KERNEL=")[1].split()[0]
    aliases: dict[str, set[str]] = {}
    for line in entries[f"lib/modules/{version}/modules.alias"].data.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            aliases.setdefault(parts[1], set()).add(parts[2])
    for name in QUICK_MODULES + LATER_MODULES:
        found = {name.replace("-", "_")} & have or aliases.get(name, set()) & have
        assert found, f"{name}: neither a module nor an alias of one in the initramfs"


def test_initramfs_copies_the_hook_tree(tmp_path: Path, pubkey: Path) -> None:
    hooks = tmp_path / "hooks"
    (hooks / "pre-root.d").mkdir(parents=True)
    (hooks / "pre-root.d" / "10-hello").write_text("#!/bin/sh\necho hello\n")
    (hooks / "pre-root.d" / "10-hello").chmod(0o755)
    (hooks / "README.md").write_text("not a hook point")
    out = tmp_path / "initrd.img"
    r = mkinitramfs.build(
        artifacts.kernel_dir(), [pubkey], out, hooks=hooks, level=1, runtime_cache=artifacts.RUNTIME_CACHE
    )
    e = cpio.read_names(zstandard.ZstdDecompressor().decompressobj().decompress(out.read_bytes()))
    hook = e["etc/seedboot/hooks/pre-root.d/10-hello"]
    assert hook.data == b"#!/bin/sh\necho hello\n" and stat.S_IMODE(hook.mode) == 0o755
    assert "etc/seedboot/hooks/README.md" not in e
    assert r.size == out.stat().st_size


def test_mkinitramfs_rejects_a_bad_key_and_unknown_module(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("untrusted comment: nope\nnot base64 at all\n")
    k = str(artifacts.kernel_dir())
    p = subprocess.run(
        [*SEEDBOOT, "mkinitramfs", "--kernel", k, "--pubkey", str(bad), "--out", str(tmp_path / "x")],
        capture_output=True, text=True, cwd=artifacts.REPO,
    )  # fmt: skip
    assert p.returncode == 1 and "error:" in p.stderr and len(p.stderr.strip().splitlines()) <= 2
    good = artifacts.signing_keypair()[1]
    p = subprocess.run(
        [*SEEDBOOT, "mkinitramfs", "--kernel", k, "--pubkey", str(good), "--out", str(tmp_path / "x"),
         "--extra-module", "no_such_driver"],
        capture_output=True, text=True, cwd=artifacts.REPO,
    )  # fmt: skip
    assert p.returncode == 1 and "no_such_driver" in p.stderr
    assert not (tmp_path / "x").exists()


def test_frozen_agent_runs_from_the_extracted_initramfs(extracted: Path) -> None:
    rt = extracted / "opt" / "seedboot"
    agent = rt / "seedboot-agent"
    # Its loader is /run/seedboot/lib/ld-linux-x86-64.so.2, which is not on the host: start it through
    # the runtime's loader. An empty environment: no leaning on the host's Python or PYTHON* variables.
    loader = str(rt / "lib" / "ld-linux-x86-64.so.2")
    p = subprocess.run([loader, str(agent), "selftest"], capture_output=True, text=True, env={}, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "selftest ok" in p.stdout
    for mod in ("pycurl", "pyfuse3", "pyudev", "netifaces", "zstandard", "ed25519"):
        assert f"{mod}:" in p.stdout
    # the block daemon runs pyfuse3 on asyncio: trio and its dependencies are not in the runtime
    assert "(asyncio mode, no trio)" in p.stdout
    # and, as tools/freeze.py PATCHES make them, asyncio without inspect (ast, dis...), still telling
    # coroutines apart, and the stdlib and zstandard without the modules they import for rare uses
    lean = "asyncio: coroutine check ok; not imported: inspect, tokenize, textwrap, ipaddress, platform"
    assert lean in p.stdout
    assert not [p for p in rt.rglob("*") if p.name in ("trio", "attr", "attrs", "outcome")]
    interp = subprocess.run(["readelf", "-l", str(agent)], capture_output=True, text=True).stdout
    assert "[Requesting program interpreter: /run/seedboot/lib/ld-linux-x86-64.so.2]" in interp


def test_frozen_runtime_has_no_host_paths(extracted: Path) -> None:
    rt = extracted / "opt" / "seedboot"
    libs = {p.name for p in (rt / "lib").iterdir()}
    assert {"libpython3.11.so.1.0", "libc.so.6", "libcurl.so.4", "libfuse3.so.3", "libudev.so.1"} <= libs
    out = subprocess.run(
        ["readelf", "-d", str(rt / "lib" / "libpython3.11.so.1.0")], capture_output=True, text=True
    )
    assert "RUNPATH" not in out.stdout and "RPATH" not in out.stdout
    assert not list((rt / "python").rglob("*.py")), "sources shipped next to the .pyc files"


def test_demo_root_image_holds_init_and_a_matching_manifest(tmp_path: Path) -> None:
    img = artifacts.demo_root(size_mb=32, data_mb=8)
    assert subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True).returncode == 0
    manifest = subprocess.run(
        ["debugfs", "-R", f"cat /{demoroot.MANIFEST}", str(img)], capture_output=True, text=True
    ).stdout
    digest = hashlib.sha256(demoroot.big_data(8 * 1024 * 1024)).hexdigest()
    assert manifest.split()[0] == digest
    init = subprocess.run(
        ["debugfs", "-R", "cat /sbin/init", str(img)], capture_output=True, text=True
    ).stdout
    assert demoroot.MARKER_OK in init and "poweroff -f" in init


def test_demo_root_refuses_data_larger_than_the_image(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match="cannot hold"):
        demoroot.build(tmp_path / "x.img", size_mb=16, data_mb=16)


@pytest.mark.qemu
def test_frozen_agent_starts_in_the_guest(image: Path, tmp_path: Path) -> None:
    """Kernel + initramfs: /init hands over to the frozen agent, which prints its first line."""
    k = artifacts.kernel_dir()
    # The guest is killed once the agent has spoken; seed.rescue=reboot in case it gets stuck earlier.
    with Guest(
        log=tmp_path / "console.log", kernel=k / "vmlinuz", initrd=image, nic=None,
        append="seedinit.debug seed.rescue=reboot", watchdog=300,
    ) as g:  # fmt: skip
        copied = g.expect(r"runtime in /run/seedboot at (\d+\.\d+)s", timeout=240)
        # The agent's console lines start with "[ N.NNs] seedboot:" (its own clock: /proc/uptime).
        first = g.expect(r"^\[\s*(\d+\.\d+)s\] seedboot: agent", timeout=120)
    console = g.console()
    handoff = re.search(r"\[\s*(\d+\.\d+)\] Run /init as init process", console)
    assert handoff is not None
    report = (
        f"kernel->/init {float(handoff.group(1)):.2f}s, runtime ready at {float(copied.group(1)):.2f}s, "
        f"agent first line at {float(first.group(1)):.2f}s "
        f"(agent start {float(first.group(1)) - float(copied.group(1)):.2f}s)"
    )
    print(report)
    (artifacts.ARTIFACTS / "boot-timing.txt").write_text(report + "\n")


@pytest.mark.qemu
def test_demo_root_boots_through_initramfs_modules_and_overlay(tmp_path: Path, pubkey: Path) -> None:
    """The demo root on a virtio disk, mounted by a stand-in /init with the initramfs's busybox
    modprobe (modules.dep), read-only under a tmpfs overlay; /run (with the agent runtime bound in,
    as the real /init does) moves along and busybox switch_root frees the initramfs: the frozen
    agent still runs from /run/seedboot in the new root, and the demo root's marker appears."""
    hooks = tmp_path / "hooks"
    (hooks / "test.d").mkdir(parents=True)
    script = hooks / "test.d" / "mount-demo"
    init_sh = (mkinitramfs.INITRAMFS_SRC / "files" / "init.sh").read_text()
    # The real /init's runtime set-up, up to (not including) its exec of the agent.
    setup = init_sh.split("grep -qw seedinit.debug")[0]
    script.write_text(
        setup + "mount -t sysfs sys /sys\n"
        "modprobe virtio_pci; modprobe virtio_blk; modprobe ext4; modprobe overlay\n"
        "for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done\n"
        "mkdir -p /lower /upper; mount -t ext4 -o ro /dev/vda /lower || exec sh\n"
        "mount -t tmpfs tmpfs /upper; mkdir -p /upper/u /upper/w\n"
        "mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot || exec sh\n"
        "for m in proc sys dev run; do mount --move /$m /newroot/$m; done\n"
        "exec switch_root /newroot /bin/sh -c "
        # argv[0] "@...": the block daemon's name; the runtime is found without it.
        '\'echo "after switch: $(exec -a @seedboot-blockdev /run/seedboot/seedboot-agent --version)";'
        " exec /sbin/init'\n"
    )
    script.chmod(0o755)
    initrd = tmp_path / "initrd.img"
    mkinitramfs.build(
        artifacts.kernel_dir(), [pubkey], initrd, hooks=hooks, level=1, runtime_cache=artifacts.RUNTIME_CACHE
    )
    root = artifacts.demo_root(size_mb=32, data_mb=8)
    with Guest(
        log=tmp_path / "console.log", kernel=artifacts.kernel_dir() / "vmlinuz", initrd=initrd, nic=None,
        append="rdinit=/etc/seedboot/hooks/test.d/mount-demo", disks=[Disk(root, snapshot=True)],
        watchdog=300,
    ) as g:  # fmt: skip
        m = g.expect(rf"({demoroot.MARKER_OK}|{demoroot.MARKER_FAIL}).*", timeout=240)
        g.wait_exit(timeout=60)
    assert re.search(r"^after switch: seedboot-agent \S+", g.console(), re.MULTILINE), g.tail()
    assert m.group(0).startswith(f"{demoroot.MARKER_OK} sha256=ok overlay=ok root=overlay fstype=overlay")


def test_runtime_libcurl_fetches_http_with_its_feature_stubs(
    extracted: Path, nginx: Callable[..., Nginx], tmp_path: Path
) -> None:
    """The runtime's libcurl (RTMP/LDAP/GSSAPI/IDN/PSL libraries replaced by stand-ins) still
    fetches over HTTP, and an unsupported scheme fails with an error instead of crashing."""
    lib = extracted / "opt" / "seedboot" / "lib"
    assert not (lib / "libgnutls.so.30").exists() and not (lib / "libkrb5.so.3").exists()
    www = tmp_path / "www"
    www.mkdir()
    (www / "block").write_bytes(b"seed" * 1000)
    server = nginx(www)
    code = (
        "import io, sys, pycurl\n"
        "b = io.BytesIO(); c = pycurl.Curl(); c.setopt(c.URL, sys.argv[1]); c.setopt(c.WRITEDATA, b)\n"
        "c.perform(); print(c.getinfo(c.RESPONSE_CODE), len(b.getvalue()))\n"
        "c.setopt(c.URL, 'ldap://127.0.0.1/x')\n"
        "try:\n    c.perform()\nexcept pycurl.error as e:\n    print('ldap', e.args[0])\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, f"{server.url}/block"],
        capture_output=True, text=True, env={"LD_LIBRARY_PATH": str(lib)}, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["200 4000", "ldap 3"]
