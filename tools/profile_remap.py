"""Carry a boot profile over to the next version of an ext2/3/4 image, through its files.

A boot profile lists image blocks in the order a boot read them. An update rewrites files
(a package manager writes each new file and renames it over the old one), so their data
moves to other blocks: the old profile then prefetches the freed places and misses the new
ones, and the update's first boot reads the moved files on demand, a round trip each.
``remap`` follows every file system block of the old profile to its file and its place in
that file (debugfs ``icheck``, ``blocks``, ``ncheck`` on the old image), then to the block at
the same place of the same path in the new image. Blocks of no file (the file system's own
metadata, free space) keep their place; blocks of a file the new image no longer has are
dropped. The result is a prediction, in the old profile's order: a trace recorded on the new
version (``seed.record``) is the exact one.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent import layout, profile
from seedboot.agent.errors import SeedError
from seedboot.agent.signature import PublicKey

log = logging.getLogger(__name__)

ICHECK_CHUNK = 400  # block numbers per icheck command: debugfs splits lines over 8 KiB


@dataclass
class Remap:
    blocks: list[int]  # the new profile, in image blocks of the new block size
    files: int  # files the old profile's blocks belong to
    moved: int  # of which the data (some of it) is elsewhere in the new image
    gone: int  # of which the new image has no file at that path


def fs_block_size(image: Path) -> int:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("Block size:"):
            return int(line.split(":", 1)[1])
    why = (out.stderr.strip().splitlines() or ["dumpe2fs found no superblock"])[-1]
    raise SeedError(
        f"{image} is not an ext2/3/4 file system ({why})",
        "a profile can be carried over through the files of ext2/3/4 images only; record a new one",
    )


def debugfs(image: Path, commands: list[str]) -> list[list[str]]:
    """Each command's output lines, in order (read-only; errors about a missing path are only
    on stderr, so such a command has no lines)."""
    if not commands:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as f:
        f.write("\n".join(commands) + "\n")
        f.flush()
        r = subprocess.run(["debugfs", "-f", f.name, str(image)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SeedError(f"debugfs cannot read {image}: {r.stderr.strip()}", "apt-get install e2fsprogs")
    out: list[list[str]] = []
    for line in r.stdout.splitlines():
        if line.startswith("debugfs: "):  # the command, echoed before its output
            out.append([])
        elif out and line.strip():
            out[-1].append(line)
    return out


def _quoted(path: str) -> str | None:
    """PATH as one debugfs argument (None: a name debugfs cannot be given)."""
    if '"' in path or "\n" in path:
        return None
    return f'"{path}"'


def _owners(image: Path, fs_blocks: list[int]) -> dict[int, int]:
    cmds = [
        "icheck " + " ".join(map(str, fs_blocks[i : i + ICHECK_CHUNK]))
        for i in range(0, len(fs_blocks), ICHECK_CHUNK)
    ]
    owner: dict[int, int] = {}
    for lines in debugfs(image, cmds):
        for line in lines:
            block, _, inode = line.partition("\t")
            if block.isdigit() and inode.isdigit():
                owner[int(block)] = int(inode)
    return owner


def _block_lists(image: Path, names: list[str]) -> list[list[int] | None]:
    """The blocks of each file (by ``<inode>`` or quoted path), in file order; None if absent."""
    lists: list[list[int] | None] = []
    for lines in debugfs(image, [f"blocks {n}" for n in names]):
        nums = [int(x) for line in lines for x in line.split() if x.isdigit()]
        lists.append(nums or None)
    return lists


def _paths(image: Path, inodes: list[int]) -> dict[int, str]:
    paths: dict[int, str] = {}
    for lines in debugfs(image, ["ncheck " + " ".join(map(str, inodes))]):
        for line in lines:
            ino, _, path = line.partition("\t")
            if ino.isdigit() and path and int(ino) not in paths:
                paths[int(ino)] = "/" + path.lstrip("/")
    return paths


def remap(old: Path, new: Path, order: list[int], old_block_size: int, new_block_size: int) -> Remap:
    """The profile ORDER (blocks of OLD, OLD_BLOCK_SIZE bytes each) for the image NEW."""
    fsbs = fs_block_size(old)
    if fs_block_size(new) != fsbs:
        raise SeedError(f"{old} and {new} have different file system block sizes", "record a new profile")
    if old_block_size % fsbs or new_block_size % fsbs:
        raise SeedError(f"image blocks are not a multiple of the file system's {fsbs}-byte blocks")
    per_old, per_new = old_block_size // fsbs, new_block_size // fsbs
    fs_blocks = [p for b in order for p in range(b * per_old, (b + 1) * per_old)]
    owner = _owners(old, fs_blocks)
    inodes = sorted(set(owner.values()))
    old_lists = dict(zip(inodes, _block_lists(old, [f"<{i}>" for i in inodes]), strict=True))
    paths = _paths(old, inodes)
    named = [(i, q) for i in inodes if i in paths and (q := _quoted(paths[i])) is not None]
    new_lists = dict(zip([i for i, _ in named], _block_lists(new, [q for _, q in named]), strict=True))
    place: dict[int, dict[int, int]] = {}  # inode -> its old block -> its place in the file
    for i, old_blocks in old_lists.items():
        place[i] = {p: k for k, p in enumerate(old_blocks or [])}
    out: list[int] = []
    seen: set[int] = set()
    moved: set[int] = set()
    gone: set[int] = set()
    for p in fs_blocks:
        ino = owner.get(p)
        target: int | None = p
        if ino is not None and ino in new_lists:
            blocks = new_lists[ino]
            k = place[ino].get(p)
            if blocks is None:
                gone.add(ino)
                target = None
            elif k is not None and k < len(blocks):
                target = blocks[k]
                if target != p:
                    moved.add(ino)
        if target is not None and target // per_new not in seen:
            seen.add(target // per_new)
            out.append(target // per_new)
    log.info(
        "profile: %d blocks, through %d files (%d moved, %d gone): %d blocks",
        len(order),
        len(new_lists),
        len(moved),
        len(gone),
        len(out),
    )
    return Remap(out, len(new_lists), len(moved), len(gone))


@dataclass
class Carried:
    path: Path  # the remapped profile, in WORKDIR
    version: int  # the version whose profile it was
    remap: Remap


def carry(
    mirror: Path,
    name: str,
    key: PublicKey,
    image: Path,
    block_size: int,
    workdir: Path,
    previous: Path | None = None,
) -> Carried:
    """The newest published version's profile, remapped onto IMAGE (published next with
    BLOCK_SIZE): that version's image is PREVIOUS, or else rebuilt from MIRROR into WORKDIR,
    verified on the way. PREVIOUS is only checked for its size: a wrong one makes a poor
    prediction, never a wrong byte (blocks are checked against the index when read)."""
    from seedboot.tools import cat, verify

    reader, rel, _ = verify.open_checked(str(mirror), name, [key], None)
    if rel.meta.profile is None:
        raise SeedError(
            f"{name} v{rel.meta.version} has no boot profile to carry over",
            "publish with --profile (seedboot profile merge of recorded traces)",
        )
    data = reader.get(layout.profile_path(name, rel.meta.profile))
    if hashlib.sha256(data).hexdigest() != rel.meta.profile:
        raise SeedError(f"{name} v{rel.meta.version}'s profile does not match its signed digest")
    order = profile.parse(data, what=f"{name} v{rel.meta.version}'s profile", nblocks=rel.index.nblocks)
    if previous is not None:
        size = previous.stat().st_size if previous.is_file() else -1
        if size != rel.index.image_size:
            raise SeedError(
                f"{previous} is not {name} v{rel.meta.version}'s image "
                f"({'no such file' if size < 0 else f'{size} bytes'}, the index says {rel.index.image_size})",
                "give that version's image, or leave --previous-image out to rebuild it from the mirror",
            )
        res = remap(previous, image, order, rel.index.block_size, block_size)
    else:
        old = workdir / f"{name}-v{rel.meta.version}.img"
        log.info("rebuilding %s v%d from %s to follow its profile's files", name, rel.meta.version, mirror)
        try:
            cat.cat_release(str(mirror), name, [key], old, version=rel.meta.version)
            res = remap(old, image, order, rel.index.block_size, block_size)
        finally:
            old.unlink(missing_ok=True)
    out = workdir / f"{name}-v{rel.meta.version}-carried.profile"
    out.write_bytes(profile.encode(res.blocks))
    return Carried(out, rel.meta.version, res)
