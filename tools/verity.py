"""dm-verity hash tree of a published image (the publisher side of agent/verity.py).

``veritysetup format`` (cryptsetup-bin) hashes the image into a Merkle tree; it works on
plain files, no device-mapper needed. The tree is written without a superblock (all its
parameters are in the signed metadata instead, so nothing unsigned steers the kernel) and
stored content-addressed as ``MIRROR/NAME/verity/<sha256 of the tree>``. The metadata's
``verity`` field carries the root hash, salt, algorithm, block sizes, data block count,
and the tree's digest and size.

dm-verity's data block size becomes the logical block size of the root device, and a file
system cannot mount on a device whose blocks are larger than its own: so it follows the
image's file system (ext2/3/4 made small by mke2fs have 1 KiB blocks), 4096 otherwise. The
hash blocks are 4096. An image whose size is not a multiple of the data block size is
hashed as if zero-padded to the next multiple (``data_size`` records the real size).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import zstandard

from seedboot.agent import metadata, verity
from seedboot.agent.atomic import write_atomic
from seedboot.agent.errors import SeedError

log = logging.getLogger(__name__)

HASH_BLOCK = metadata.VERITY_BLOCK
TREE_LEVEL = 3  # the 8.5 MB tree of the benchmark image: 1.78 MB at level 3, 1.80 at 9, 1.78 at 19


def fs_block_size(image: Path) -> int:
    """The data block size for IMAGE: its ext2/3/4 block size, else 4096."""
    with open(image, "rb") as f:
        sb = f.read(2048)[1024:]
    if len(sb) >= 58 and struct.unpack_from("<H", sb, 56)[0] == 0xEF53:
        size = 1024 << int(struct.unpack_from("<I", sb, 24)[0])
        if size in metadata.VERITY_DATA_BLOCKS:
            return size
    return HASH_BLOCK


def _veritysetup(*args: str) -> str:
    exe = shutil.which("veritysetup")
    if exe is None:
        raise SeedError("veritysetup not found", "install cryptsetup-bin, or publish with --no-verity")
    r = subprocess.run([exe, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SeedError(f"veritysetup {args[0]} failed: {r.stderr.strip() or r.returncode}")
    return r.stdout


def _field(out: str, label: str) -> str:
    m = re.search(rf"^{label}:\s*(\S+)", out, re.M)
    if not m:
        raise SeedError(f"veritysetup output has no {label!r}", "unexpected cryptsetup version")
    return m.group(1)


def build(image: Path, mirror: Path, name: str, salt: str | None = None) -> metadata.Verity:
    """Hash ``image``, store the tree in the mirror, return the parameters to sign."""
    size = image.stat().st_size
    if size <= 0:
        raise SeedError(f"image {image} is empty")
    salt = salt if salt is not None else os.urandom(32).hex()
    block = fs_block_size(image)
    blocks = -(-size // block)
    mirror.mkdir(parents=True, exist_ok=True)
    # A padded copy goes in the mirror's file system (/tmp may be RAM); the dot keeps it
    # from looking like an image.
    with tempfile.TemporaryDirectory(prefix=".verity-tmp-", dir=mirror) as tmp:
        data = image
        if size % block:
            # The kernel sees the image zero-padded to whole blocks; hash exactly that.
            data = Path(tmp) / "padded"
            shutil.copyfile(image, data)
            os.truncate(data, blocks * block)
            log.info("image size %d is not a multiple of %d: hashing it zero-padded", size, block)
        tree_file = Path(tmp) / "tree"
        out = _veritysetup(
            "format",
            str(data),
            str(tree_file),
            "--no-superblock",
            "--hash=sha256",
            f"--data-block-size={block}",
            f"--hash-block-size={HASH_BLOCK}",
            f"--data-blocks={blocks}",
            f"--salt={salt}",
        )
        tree = tree_file.read_bytes()
    root_hash = _field(out, "Root hash")
    if int(_field(out, "Data blocks")) != blocks or _field(out, "Salt") != salt:
        raise SeedError("veritysetup did not use the parameters given", "unexpected cryptsetup version")
    digest = hashlib.sha256(tree).hexdigest()
    path = mirror / verity.tree_path(name, digest)
    if not path.exists() or path.stat().st_size != len(tree):
        write_atomic(path, tree, sync=False)
    # The compressed copy is what booting agents fetch; the plain tree stays for veritysetup
    # and for agents from before the .zst.
    # Its digest is signed, and agents check only that (not the tree it unpacks to): so it is
    # unpacked and compared here, and a .zst already on the mirror for this tree (an earlier
    # publish, perhaps with another zstd) is kept as it is rather than replaced under agents.
    zst = mirror / verity.packed_tree_path(name, digest)
    try:
        packed = zst.read_bytes()
    except FileNotFoundError:
        packed = b""
    if not packed or _unpack(packed, len(tree)) != tree:
        packed = zstandard.ZstdCompressor(level=TREE_LEVEL).compress(tree)
        if _unpack(packed, len(tree)) != tree:
            raise SeedError(f"zstd did not round-trip the dm-verity tree of {image}", "a zstandard bug?")
        write_atomic(zst, packed, sync=False)
    log.info(
        "dm-verity tree of %s: root %s, %d data blocks, tree %d bytes", image, root_hash, blocks, len(tree)
    )
    return metadata.Verity(
        root_hash=root_hash,
        salt=salt,
        tree=digest,
        tree_size=len(tree),
        data_blocks=blocks,
        data_size=size,
        data_block_size=block,
        hash_block_size=HASH_BLOCK,
        tree_zst_size=len(packed),
        tree_zst=hashlib.sha256(packed).hexdigest(),
    )


def _unpack(packed: bytes, size: int) -> bytes | None:
    try:
        return zstandard.ZstdDecompressor().decompress(packed, max_output_size=size)
    except zstandard.ZstdError:
        return None


def verify(image: Path, tree: Path, v: metadata.Verity) -> bool:
    """``veritysetup verify`` of a file against the signed parameters (True if every block matches)."""
    with tempfile.TemporaryDirectory(prefix="seedboot-verity-") as tmp:
        data = image
        if image.stat().st_size != v.data_blocks * v.data_block_size:
            data = Path(tmp) / "padded"
            shutil.copyfile(image, data)
            os.truncate(data, v.data_blocks * v.data_block_size)
        exe = shutil.which("veritysetup") or "veritysetup"
        r = subprocess.run(
            [exe, "verify", str(data), str(tree), v.root_hash, *verity.veritysetup_args(v)],
            capture_output=True,
            text=True,
        )
    if r.returncode != 0:
        log.info("veritysetup verify: %s", r.stderr.strip())
    return r.returncode == 0
