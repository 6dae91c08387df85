"""``seedboot publish --carry-profile``: an update's files moved, its profile follows them.

Real ext4 images (mke2fs -d), changed the way a package upgrade changes them (a new file
written beside the old one and renamed over it), published into a mirror and read back."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from seedboot.agent import layout, metadata, profile
from seedboot.agent.reader import DirReader
from seedboot.agent.release import load_keys, open_release
from tests.helpers import keypair, make_ext4
from tests.test_publish import run_cli

BS = 64 * 1024  # image blocks (publish --block-size 64K): 16 file system blocks each


def debugfs(image: Path, *commands: str, write: bool = False) -> str:
    args = ["debugfs", *(["-w"] if write else []), *[a for c in commands for a in ("-R", c)], str(image)]
    if len(commands) > 1:  # -R takes one command: several go through a command file
        script = image.with_suffix(".cmds")
        script.write_text("\n".join(commands) + "\n")
        args = ["debugfs", *(["-w"] if write else []), "-f", str(script), str(image)]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def image_blocks(image: Path, path: str) -> list[int]:
    """The image blocks (BS) holding PATH's data, in file order."""
    header = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    fsbs = int(next(x for x in header.splitlines() if x.startswith("Block size:")).split(":")[1])
    out: list[int] = []
    for fs_block in map(int, debugfs(image, f"blocks {path}").split()):
        if fs_block * fsbs // BS not in out:
            out.append(fs_block * fsbs // BS)
    return out


def dpkg_replace(image: Path, path: str, content: Path) -> None:
    """What dpkg does: the new file written under another name while the old one is still
    there (so it gets other blocks), then renamed over the old one."""
    debugfs(image, f"write {content} {path}.dpkg-new", f"rm {path}", f"ln {path}.dpkg-new {path}",
            f"unlink {path}.dpkg-new", write=True)  # fmt: skip


@pytest.fixture
def update(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """v1 published with a profile of its two libraries' blocks; v2 with one library
    upgraded and the other removed. Returns (mirror, key, v2 image, upgraded content)."""
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "liba.so").write_bytes(os.urandom(600 * 1024))
    (src / "lib" / "libb.so").write_bytes(os.urandom(200 * 1024))
    (src / "etc").mkdir()
    (src / "etc" / "os-release").write_text("VERSION=1\n")
    v1 = make_ext4(src, tmp_path / "v1.ext4", 32)
    key, _pub = keypair(tmp_path, "k")
    order = image_blocks(v1, "/lib/liba.so") + image_blocks(v1, "/lib/libb.so")
    (tmp_path / "v1.profile").write_bytes(profile.encode(order))
    mirror = tmp_path / "mirror"
    r = run_cli("publish", v1, "--mirror", mirror, "--name", "demo", "--key", key, "--block-size", "64K",
                "--profile", tmp_path / "v1.profile")  # fmt: skip
    assert r.returncode == 0, r.stderr
    v2 = tmp_path / "v2.ext4"
    v2.write_bytes(v1.read_bytes())
    new_liba = tmp_path / "liba.so.2"
    new_liba.write_bytes(os.urandom(600 * 1024))
    dpkg_replace(v2, "/lib/liba.so", new_liba)
    debugfs(v2, "rm /lib/libb.so", write=True)
    r = subprocess.run(["e2fsck", "-fn", str(v2)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    return mirror, key, v2, new_liba


def published_profile(mirror: Path, version: int) -> list[int]:
    reader = DirReader(mirror)
    meta = metadata.parse(reader.get(layout.meta_path("demo", version)))
    assert meta.profile is not None
    return profile.parse(reader.get(layout.profile_path("demo", meta.profile)))


def test_the_profile_follows_the_upgraded_files_to_their_new_blocks(
    update: tuple[Path, Path, Path, Path],
) -> None:
    mirror, key, v2, new_liba = update
    v1_liba = image_blocks(mirror.parent / "v1.ext4", "/lib/liba.so")
    v2_liba = image_blocks(v2, "/lib/liba.so")
    assert not set(v1_liba[1:-1]) & set(v2_liba), "the upgrade put liba.so elsewhere"
    r = run_cli("publish", v2, "--mirror", mirror, "--name", "demo", "--key", key, "--block-size", "64K",
                "--carry-profile")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "profile of version 1 carried over:" in r.stdout and "(1 moved, 1 gone)" in r.stdout, r.stdout
    assert "published demo version 2" in r.stdout
    carried = published_profile(mirror, 2)
    # all of the new library's data, in file order, where the old one's was in the old profile
    # (blocks of no file that shared the old one's first block keep their place, before it)
    assert [b for b in carried if b in v2_liba] == v2_liba, (carried, v2_liba)
    assert carried.index(v2_liba[0]) <= 1, carried
    image = v2.read_bytes()
    assert new_liba.read_bytes() in b"".join(image[b * BS : (b + 1) * BS] for b in v2_liba)
    # the old library's own blocks (wholly its data) are not prefetched for nothing
    assert not set(v1_liba[1:-1]) & set(carried)
    # the removed library's blocks are gone from the profile (except those it shares with the
    # old library's first or last block, whose other bytes keep their place, or with the new one)
    v1_libb = image_blocks(mirror.parent / "v1.ext4", "/lib/libb.so")
    assert not (set(v1_libb) - {v1_liba[0], v1_liba[-1], *v2_liba}) & set(carried)
    assert len(v1_libb) > 2
    open_release(DirReader(mirror), "demo", load_keys([key.with_suffix(".pub")]), 2)  # verifies


def test_carrying_a_profile_needs_one_and_an_ext_image(update: tuple[Path, Path, Path, Path]) -> None:
    mirror, key, v2, _ = update
    other = mirror.parent / "other-mirror"
    r = run_cli("publish", mirror.parent / "v1.ext4", "--mirror", other, "--name", "demo", "--key", key)
    assert r.returncode == 0, r.stderr
    r = run_cli("publish", v2, "--mirror", other, "--name", "demo", "--key", key, "--carry-profile")
    assert r.returncode != 0
    assert "demo v1 has no boot profile to carry over" in r.stderr, r.stderr
    assert not (other / "demo" / "2").exists() and (other / "demo" / "latest").read_text().strip() == "1"
    junk = mirror.parent / "junk.img"
    junk.write_bytes(os.urandom(2 * 2**20))
    r = run_cli("publish", junk, "--mirror", mirror, "--name", "demo", "--key", key, "--block-size", "64K",
                "--carry-profile")  # fmt: skip
    assert r.returncode != 0 and "is not an ext2/3/4 file system" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 2, "the error and a hint"
    assert (mirror / "demo" / "latest").read_text().strip() == "1"


def test_the_previous_image_given_instead_of_rebuilt(update: tuple[Path, Path, Path, Path]) -> None:
    """--previous-image: the publisher's own copy of the last version's image is used as it is
    (the same profile as rebuilding it from the mirror); one of another size is refused."""
    mirror, key, v2, _ = update
    other, third = mirror.parent / "mirror-b", mirror.parent / "mirror-c"
    shutil.copytree(mirror, other)
    shutil.copytree(mirror, third)
    common = ["--name", "demo", "--key", key, "--block-size", "64K", "--carry-profile"]
    r = run_cli("publish", v2, "--mirror", mirror, *common)
    assert r.returncode == 0, r.stderr
    short = mirror.parent / "short.img"
    short.write_bytes((mirror.parent / "v1.ext4").read_bytes()[: 2**20])
    r = run_cli("publish", v2, "--mirror", other, *common, "--previous-image", short)
    assert r.returncode != 0 and "short.img is not demo v1's image (1048576 bytes" in r.stderr, r.stderr
    assert (other / "demo" / "latest").read_text().strip() == "1"
    r = run_cli("publish", v2, "--mirror", other, "--name", "demo", "--key", key, "--previous-image", short)
    assert r.returncode != 0 and "--previous-image goes with --carry-profile" in r.stderr, r.stderr
    r = run_cli("publish", v2, "--mirror", other, *common, "--previous-image", mirror.parent / "v1.ext4")
    assert r.returncode == 0, r.stderr
    assert "(1 moved, 1 gone)" in r.stdout, r.stdout
    assert published_profile(other, 2) == published_profile(mirror, 2)
    # and it is that file that is followed: v2's own image given as v1's moves nothing
    r = run_cli("publish", v2, "--mirror", third, *common, "--previous-image", v2)
    assert r.returncode == 0 and "(0 moved, 0 gone)" in r.stdout, (r.stdout, r.stderr)
