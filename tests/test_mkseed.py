"""Seed disks as a user would check them: the partition table, the files GRUB needs on /boot and
the ESP, the KNXBLOCK cache, each format's size and content, and the GRUB menu's entries.

No QEMU here (tests/test_hypervisor_matrix.py boots the disks). The kernel and miniroot are
random files of realistic size (incompressible, like the real zstd/bzImage payloads), so the
24 MB budget is checked against what a real disk carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from seedboot.agent.errors import SeedError
from seedboot.grub import menu
from seedboot.tools import diskformats, diskimage, keys, mkseed, publish
from seedboot.tools.cli import main as cli_main
from tests.helpers import Nginx, keypair, make_ext4

KERNEL_BYTES = 8_300_000  # Debian 12's vmlinuz is 8.2 MB
# With Debian's kernel, a miniroot of up to ~10 MB keeps every format under 24 MB: vhd allocates
# 2 MiB at a time, vdi and parallels 1 MiB (the others follow the written bytes closely).
INITRD_BYTES = 10_000_000
GiB = 1 << 30


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mkseed-in")
    kdir = d / "kernel"
    kdir.mkdir()
    (kdir / "vmlinuz").write_bytes(os.urandom(KERNEL_BYTES))
    (kdir / "kernel-version").write_text("6.1.0-test-amd64\n")
    initrd = d / "initrd.img"
    initrd.write_bytes(os.urandom(INITRD_BYTES))
    key, pub = keypair(d)
    return {"kernel": kdir, "initrd": initrd, "key": key, "pub": pub, "dir": d}


@pytest.fixture(scope="module")
def built(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> mkseed.SeedResult:
    out = tmp_path_factory.mktemp("mkseed-out")
    spec = mkseed.SeedSpec(
        mirrors=["http://10.0.2.2:8080", "https://mirror.example.org/seed"],
        names=["demo"],
        pubkeys=[inputs["pub"]],
        kernel=inputs["kernel"],
        out=out,
        size=16 * GiB,
        formats=(*diskformats.DEFAULT_FORMATS, "ova"),
        initrd=inputs["initrd"],
        versions=-1,
    )
    return mkseed.build(spec)


def _partitions(img: Path) -> list[dict[str, object]]:
    out = subprocess.run(["sfdisk", "--json", str(img)], capture_output=True, text=True, check=True).stdout
    parts: list[dict[str, object]] = json.loads(out)["partitiontable"]["partitions"]
    return parts


def _probe(img: Path, offset: int) -> dict[str, str]:
    out = subprocess.run(
        ["blkid", "-p", "-O", str(offset), "-o", "export", str(img)], capture_output=True, text=True
    ).stdout
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


def _boot_fs(res: mkseed.SeedResult, tmp: Path) -> Path:
    """The /boot partition cut out of the raw disk, for debugfs (no mount needed)."""
    return diskimage.extract(res.files["raw"], res.layout.boot.start, res.layout.boot.size, tmp / "boot.ext2")


def _debugfs(fs: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(fs)], capture_output=True, text=True, check=True
    ).stdout


def test_partition_table_boot_esp_and_cache_to_the_end(built: mkseed.SeedResult) -> None:
    raw = built.files["raw"]
    assert raw.stat().st_size == 16 * GiB
    parts = _partitions(raw)
    assert [p["type"] for p in parts] == ["83", "83", "ef"]  # cache, /boot, ESP in disk order
    assert parts[1].get("bootable") is True
    # The gap before the first partition holds GRUB's core.img.
    core = (diskimage.GRUB_PC_DIR / "boot.img").stat().st_size
    assert int(parts[0]["start"]) * 512 >= core  # type: ignore[call-overload]
    end = int(parts[2]["start"]) + int(parts[2]["size"])  # type: ignore[call-overload]
    # The ESP just fits GRUB's image (a wide FAT would cost allocation units in every format);
    # what is left past it, less than one ext4 group, stays unpartitioned.
    assert 16 * GiB - 130 * (1 << 20) < end * 512 <= 16 * GiB
    assert int(parts[2]["size"]) * 512 <= 2 * (1 << 20)  # type: ignore[call-overload]
    assert int(parts[0]["size"]) * 512 > 16 * GiB - 140 * (1 << 20), "the cache takes nearly all"  # type: ignore[call-overload]
    assert _probe(raw, built.layout.boot.start) == {**_probe(raw, built.layout.boot.start), "TYPE": "ext2"}
    assert _probe(raw, built.layout.boot.start)["LABEL"] == "SEEDBOOT"
    assert _probe(raw, built.layout.esp.start)["TYPE"] == "vfat"
    cache = _probe(raw, built.layout.cache.start)
    assert (cache["TYPE"], cache["LABEL"]) == ("ext4", "KNXBLOCK")


def test_mbr_holds_grub_boot_and_core_images(built: mkseed.SeedResult) -> None:
    with open(built.files["raw"], "rb") as f:
        head = f.read(2048 * 512)
    assert head[510:512] == b"\x55\xaa"
    assert head[:440] == (diskimage.GRUB_PC_DIR / "boot.img").read_bytes()[:440]
    # core.img starts with diskboot.img, whose blocklist points at the sectors after it.
    assert head[512:1024] != bytes(512)
    assert b"search" in head[512:] or b"biosdisk" in head[512:] or len(head[512:].rstrip(b"\0")) > 30_000


def test_boot_partition_has_kernel_miniroot_and_menu(
    built: mkseed.SeedResult, inputs: dict[str, Path], tmp_path: Path
) -> None:
    fs = _boot_fs(built, tmp_path)
    listing = _debugfs(fs, "ls -l /")
    for name in ("vmlinuz", "initrd.img", "grub", "seed.json", "keys"):
        assert name in listing
    got = tmp_path / "vmlinuz"
    _debugfs(fs, f"dump /vmlinuz {got}")
    assert got.read_bytes() == (inputs["kernel"] / "vmlinuz").read_bytes()
    cfg = _debugfs(fs, "cat /grub/grub.cfg")
    assert cfg == built.menu
    assert "linux /vmlinuz" in cfg and "initrd /initrd.img" in cfg
    seed = json.loads(_debugfs(fs, "cat /seed.json"))
    assert seed["mirrors"] == ["http://10.0.2.2:8080", "https://mirror.example.org/seed"]
    assert seed["kernel"] == "6.1.0-test-amd64"


def test_esp_has_removable_path_uefi_grub(built: mkseed.SeedResult, tmp_path: Path) -> None:
    spec = f"{built.files['raw']}@@{built.layout.esp.start}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    listing = subprocess.run(
        ["mdir", "-b", "-i", spec, "::/EFI/BOOT"], capture_output=True, text=True, env=env
    )
    assert "BOOTX64.EFI" in listing.stdout.upper(), listing.stderr
    efi = tmp_path / "BOOTX64.EFI"
    subprocess.run(["mcopy", "-i", spec, "::/EFI/BOOT/BOOTX64.EFI", str(efi)], check=True, env=env)
    data = efi.read_bytes()
    assert data[:2] == b"MZ"
    pe = int.from_bytes(data[0x3C:0x40], "little")
    assert data[pe : pe + 4] == b"PE\0\0"
    assert int.from_bytes(data[pe + 4 : pe + 6], "little") == 0x8664  # x86-64
    assert built.boot_uuid.encode() in data, "the early config finds /boot by its UUID"


def test_every_format_is_small_and_holds_the_same_disk(built: mkseed.SeedResult) -> None:
    raw = built.files["raw"]
    assert diskimage.allocated(raw) < mkseed.MAX_DISK_BYTES
    for name, fmt in diskformats.FORMATS.items():
        p = built.files[name]
        assert p.name == fmt.filename
        size = diskimage.allocated(p) if name == "raw" else p.stat().st_size
        assert size < mkseed.MAX_DISK_BYTES, f"{p.name} is {size / 1e6:.1f} MB"
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(p)], capture_output=True, check=True
            ).stdout
        )
        assert info["format"] == fmt.qemu_format
        assert info["virtual-size"] == 16 * GiB
        if name != "raw":
            same = subprocess.run(
                ["qemu-img", "compare", "-f", "raw", "-F", fmt.qemu_format, str(raw), str(p)]
            )
            assert same.returncode == 0, f"{p.name} differs from the raw disk"


def test_vhd_is_dynamic(built: mkseed.SeedResult) -> None:
    data = built.files["vhd"].read_bytes()[-512:]
    assert data[:8] == b"conectix"
    assert int.from_bytes(data[60:64], "big") == 3  # disk type 3: dynamic (2 would be fixed)


def test_ova_descriptor_disk_and_manifest(built: mkseed.SeedResult, tmp_path: Path) -> None:
    ova = built.files["ova"]
    assert ova.stat().st_size < mkseed.MAX_DISK_BYTES
    with tarfile.open(ova) as tar:
        names = tar.getnames()
        assert names[0].endswith(".ovf"), "OVF requires the descriptor first"
        # Debian's Python 3.11.2 predates extraction filters (3.11.4): check the members by hand there.
        assert all(m.isfile() and "/" not in m.name and ".." not in m.name for m in tar.getmembers())
        tar.extractall(tmp_path)
    root = ET.parse(tmp_path / names[0]).getroot()
    ns = {"ovf": "http://schemas.dmtf.org/ovf/envelope/1"}
    disk = root.find("ovf:DiskSection/ovf:Disk", ns)
    assert disk is not None
    assert disk.get(f"{{{ns['ovf']}}}capacity") == str(16 * GiB)
    vmdk = tmp_path / "seed-disk1.vmdk"
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", str(vmdk)], capture_output=True).stdout
    )
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    same = subprocess.run(["qemu-img", "compare", "-F", "vmdk", str(built.files["raw"]), str(vmdk)])
    assert same.returncode == 0
    import hashlib

    for line in (tmp_path / "seed.mf").read_text().splitlines():
        fname = line[line.index("(") + 1 : line.index(")")]
        assert line.endswith(hashlib.sha256((tmp_path / fname).read_bytes()).hexdigest())


def test_cache_filesystem_is_sparse_and_checks_clean(built: mkseed.SeedResult, tmp_path: Path) -> None:
    c = built.layout.cache
    assert c.size > 15 * GiB
    # The whole 16 GiB raw disk takes little more than the kernel and the miniroot.
    assert diskimage.allocated(built.files["raw"]) < KERNEL_BYTES + INITRD_BYTES + 3_000_000
    part = diskimage.extract(built.files["raw"], c.start, c.size, tmp_path / "cache.ext4")
    fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    head = subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True).stdout
    assert "has_journal" in head and "extent" in head


# --- the GRUB menu: a table of configurations and what each must produce ---------------------

BASE = menu.MenuConfig(
    images=(menu.Image("demo", 3, (menu.Version(2, 1_700_000_000),)),), mirrors=("http://m1",)
)


@pytest.mark.parametrize(
    ("cfg", "must", "must_not"),
    [
        (
            BASE,
            [
                "set timeout=3",
                "set default=demo",
                "serial --unit=0 --speed=115200",
                "terminal_input serial console",
                "terminal_output serial console",
                "console=tty0 console=ttyS0,115200 seed.name=demo seed.mirrors=http://m1",
                "demo: newest version from the mirrors, v3 when this disk was made",
                "--id demo-offline --hotkey=o",
                "seed.offline",
                "--id demo-record --hotkey=r",
                "seed.record",
                "submenu 'demo: older signed versions (roll back) >'",
                "seed.version=2",
                "signed 2023-11-14",
                "rd.seed.break=mirror seed.rescue=shell",
            ],
            ["seed.version=3"],  # the newest entry follows the mirror's latest, it does not pin
        ),
        (
            menu.MenuConfig(images=(menu.Image("demo"),), mirrors=("http://a", "http://b"), timeout=10),
            [
                "set timeout=10",
                "seed.mirrors=http://a,http://b",
                "'demo: newest version from the mirrors' --id demo {",
            ],
            ["submenu", "seed.version="],
        ),
        (
            menu.MenuConfig(
                images=(menu.Image("demo", 1), menu.Image("alpine", 7, (menu.Version(5),))),
                mirrors=("http://m",),
                default="alpine",
                append=("panic=-1",),
            ),
            ["set default=alpine", "seed.name=alpine", "--id alpine-v5", "date unknown", "panic=-1"],
            ["--id alpine-offline --hotkey"],  # hotkeys belong to the first image only
        ),
        (
            menu.MenuConfig(images=(menu.Image("demo"),), mirrors=("http://m/x?a=1&b=2",), serial=""),
            ["'seed.mirrors=http://m/x?a=1&b=2'"],  # GRUB's lexer would cut at '&' unquoted
            ["terminal_output serial", "console=ttyS0"],
        ),
    ],
)
def test_menu_table(cfg: menu.MenuConfig, must: list[str], must_not: list[str]) -> None:
    text = menu.render(cfg)
    for s in must:
        assert s in text, s
    for s in must_not:
        assert s not in text, s
    # Every entry loads the kernel and the miniroot, and the ids match entry_ids().
    assert text.count("linux /vmlinuz") == text.count("initrd /initrd.img") == len(menu.entry_ids(cfg))


def test_menu_rejects_unknown_default() -> None:
    with pytest.raises(ValueError, match="demo-v9"):
        menu.render(menu.MenuConfig(images=(menu.Image("demo"),), mirrors=("http://m",), default="demo-v9"))


def test_grub_quote() -> None:
    assert menu.quote("seed.name=demo") == "seed.name=demo"
    assert menu.quote("it's") == "'it'\\''s'"
    assert menu.quote("a b") == "'a b'"


# --- versions from a real published mirror --------------------------------------------------


@pytest.fixture(scope="module")
def mirror3(inputs: dict[str, Path]) -> Path:
    """A mirror with versions 1..3 of 'demo'; version 2's signature is then broken."""
    d = inputs["dir"] / "pub"
    (d / "tree").mkdir(parents=True)
    (d / "tree" / "hello").write_text("a small image\n")
    img = make_ext4(d / "tree", d / "demo.ext4", size_mb=4)
    key = keys.load_secret_key(inputs["key"])
    mirror = d / "mirror"
    for _ in range(3):
        publish.publish(img, mirror, "demo", key)
    sig = mirror / "demo" / "meta" / "2.json.minisig"
    lines = sig.read_text().splitlines()
    lines[1] = lines[1][:-6] + ("AAAAA=" if not lines[1].endswith("AAAAA=") else "BBBBB=")
    sig.write_text("\n".join(lines) + "\n")
    return mirror


def test_versions_skip_what_does_not_verify(mirror3: Path, inputs: dict[str, Path]) -> None:
    from seedboot.agent.release import load_keys

    img = mkseed.find_versions([str(mirror3)], "demo", load_keys([inputs["pub"]]), count=3)
    assert img.latest == 3
    assert [v.version for v in img.older] == [1]  # 2 has a bad signature: not offered


def test_versions_over_http_and_wrong_key_refused(
    mirror3: Path, inputs: dict[str, Path], nginx: Callable[..., Nginx], tmp_path: Path
) -> None:
    from seedboot.agent.release import load_keys

    srv = nginx(mirror3)
    img = mkseed.find_versions(["http://127.0.0.1:1", srv.url], "demo", load_keys([inputs["pub"]]), count=1)
    assert (img.latest, [v.version for v in img.older]) == (3, [1])
    _, other = keypair(tmp_path, "other")
    with pytest.raises(SeedError, match="not trusted"):
        mkseed.find_versions([srv.url], "demo", load_keys([other]), count=1)


def test_cli_menu_lists_rollback_and_bad_input_is_one_line(
    mirror3: Path, inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    common = ["mkseed", "--mirror", "http://10.0.2.2:1", "--name", "demo", "--pubkey", str(inputs["pub"]),
              "--kernel", str(inputs["kernel"]), "--initrd", str(inputs["initrd"]),
              "--out", str(out)]  # fmt: skip
    rc = cli_main(
        [*common, "--list-from", str(mirror3), "--formats", "qcow2", "--size", "1G", "--timeout", "5"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "seed.qcow2" in printed and "demo-v1" in printed and "[4/" in printed
    assert sorted(p.name for p in out.iterdir()) == ["seed.qcow2"], "no work files left behind"
    for bad, message in (
        (["--size", "20M"], "leaves"),
        (["--size", "lots"], "cannot read size"),
        (["--formats", "vmdk,iso"], "unknown disk format iso"),
        (["--default", "nope"], "default entry"),
        (["--kernel", str(tmp_path)], "no vmlinuz"),
    ):
        assert cli_main([*common, "--list-from", str(mirror3), *bad]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") <= 2, err
    assert cli_main(common) == 1  # the guest's URL does not answer from here
    assert "--list-from" in capsys.readouterr().err


# --- the demo's pieces: its console parsing and its counting mirror server ------------------

CONSOLE = """\
[    4.59] 00:04: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A
[   8.37s] seedboot: agent 0.1.0 up at 8.19s (kernel ran /init at 5.01s)
[   8.89s] seedboot: early     ok      0.48s  mounted /sys; image demo vlatest, 1 mirror(s)
[  13.17s] seedboot: cache     ok      0.27s  /dev/vda1 (LABEL=KNXBLOCK) on /knxblock, 16094 of 16128 MiB free
[  18.39s] seedboot: blockdev  ok      3.19s  /run/seedboot/blockdev/disk.img (64 MiB) served by pid 113
SEEDBOOT-DEMO-OK sha256=ok overlay=ok root=overlay fstype=overlay uptime=22.04
"""


def test_demo_reads_stage_times_from_the_console() -> None:
    from seedboot.tools import demo

    rep = demo.BootReport("online")
    demo.parse_console(CONSOLE, rep)
    assert rep.agent_up == 8.19
    assert [(s[0], s[2]) for s in rep.stages] == [("early", 0.48), ("cache", 0.27), ("blockdev", 3.19)]
    assert rep.cache_used_mib == 34
    assert rep.marker_at == 22.04
    table = demo.summary([rep], cast(publish.PublishResult, _FakePublished()))
    assert "stage blockdev" in table and "3.19 s" in table and "22.04 s" in table


class _FakeStats:
    image_size = 100_000_000
    blocks = 384
    bytes_stored = 34_600_000


class _FakePublished:
    name = "demo"
    version = 1
    stats = _FakeStats()


def test_demo_mirror_server_counts_blocks_and_bytes(tmp_path: Path) -> None:
    import urllib.request

    from seedboot.tools import demo

    (tmp_path / "blocks" / "ab").mkdir(parents=True)
    (tmp_path / "blocks" / "ab" / "abcd").write_bytes(b"x" * 1000)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "latest").write_text("1\n")
    with demo.MirrorServer(tmp_path) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        assert urllib.request.urlopen(f"{base}/blocks/ab/abcd").read() == b"x" * 1000
        assert urllib.request.urlopen(f"{base}/demo/latest").read() == b"1\n"
        assert srv.served.snapshot() == (2, 1, 1002)
