"""dm-verity between the loop device and the root mount: the kernel checks every read.

The agent already checks each block's digest when it fetches or loads it; dm-verity adds a
check by the kernel on every read of the root device, including reads served from a cache
partition that was altered while the machine was off, and including page-cache misses long
after the boot. A mismatch is an I/O error (EIO) for that read, never bad data.

The hash tree (``NAME/verity/<sha256>``, published by tools/verity.py) is fetched, checked
against the digest in the signed metadata, and kept on the cache next to the release. All
verity parameters come from the signed metadata (the tree has no superblock), so nothing
unsigned steers the kernel. Setup uses the device-mapper ioctls directly (dm.py), so the
miniroot needs no dmsetup; it needs the ``dm-verity`` module and its dependencies
(``dm-mod``, ``dm-bufio``, ``reed_solomon``). The table is what dmsetup would load:

    dmsetup create seedroot --readonly --table \\
        "0 <data_blocks*8> verity 1 <data dev> <hash dev> 4096 4096 <data_blocks> 0 sha256 <root> <salt>"
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent.atomic import write_atomic
from seedboot.agent.errors import FormatError, SeedError
from seedboot.agent.metadata import Verity
from seedboot.agent.reader import Reader

log = logging.getLogger(__name__)

DM_NAME = "seedroot"
TIMEOUT = 30.0
# The kernel's fast sha256 (SSSE3, AVX, AVX2 and SHA-NI code) is a module that nothing loads on
# its own: without it dm-verity hashes every read of the root with the generic C code, several
# times slower on the CPUs that hypervisors pass through. Loaded only if the CPU has one of the
# features it needs (under QEMU's default qemu64 model it would load, find none and fail).
FAST_HASH = {"sha256": ("sha256-ssse3", ("sha_ni", "avx2", "avx", "ssse3"))}


def tree_path(name: str, digest: str) -> str:
    """Where the hash tree lives in a mirror tree (and in the cache, laid out the same way)."""
    return f"{name}/verity/{digest}"


def packed_tree_path(name: str, digest: str) -> str:
    """Where the tree's zstd copy lives, beside it (``Verity.tree_zst_size`` says if there is one)."""
    return tree_path(name, digest) + ".zst"


def veritysetup_args(v: Verity) -> list[str]:
    """The parameters as ``veritysetup verify/open`` options (for tools and tests)."""
    return [
        "--no-superblock",
        f"--hash={v.hash}",
        f"--data-block-size={v.data_block_size}",
        f"--hash-block-size={v.hash_block_size}",
        f"--data-blocks={v.data_blocks}",
        f"--salt={v.salt}",
    ]


def table(v: Verity, data_dev: str, hash_dev: str) -> str:
    """The device-mapper table line (hash start block 0: the tree has no superblock)."""
    sectors = v.data_blocks * v.data_block_size // 512
    return (
        f"0 {sectors} verity {v.hash_type} {data_dev} {hash_dev} {v.data_block_size} {v.hash_block_size} "
        f"{v.data_blocks} 0 {v.hash} {v.root_hash} {v.salt or '-'}"
    )


def is_tree(data: bytes, v: Verity) -> bool:
    """True if DATA is the hash tree the metadata signed (its size and SHA-256)."""
    return len(data) == v.tree_size and hashlib.sha256(data).hexdigest() == v.tree


def top_matches(path: Path, v: Verity) -> bool:
    """True if the file at PATH has the tree's signed size and its first hash block (the top
    level: veritysetup writes the levels top first) hashes to the signed root hash. dm-verity
    checks every lower hash block against its parent when it reads it, so this is all the
    kernel needs to be given; a damaged lower block is an I/O error, never bad data."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != v.tree_size:
            return False
        top = f.read(v.hash_block_size)
    return _top_matches(top, v)


def _top_matches(top: bytes, v: Verity) -> bool:
    return hashlib.new(v.hash, bytes.fromhex(v.salt) + top).hexdigest() == v.root_hash


def forget_damaged_tree(path: Path, block: int) -> None:
    """dm-verity found hash block BLOCK of the cached tree at PATH corrupt: remove the file
    (the loop device under dm-verity keeps its own reference), so the next boot fetches the
    tree again instead of failing the same reads."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        log.warning("dm-verity: hash block %d of %s is corrupt, and it cannot be removed: %s", block, path, e)
        return
    log.warning("dm-verity: hash block %d of %s is corrupt: removed; the next boot fetches it", block, path)


def fetch_tree(name: str, v: Verity, cache: Path, reader: Reader | None) -> Path:
    """The hash tree on the cache: the cached copy if its size and top block match the signed
    values (it was checked whole before it was written, and dm-verity checks each lower block
    when it reads it: hashing all of it again cost the offline boot's root stage ~1 s of guest
    time under -icount),
    else fetched and checked whole (a mirror's bad tree is refused before the kernel sees it)."""
    path = cache / tree_path(name, v.tree)
    try:
        if top_matches(path, v):
            return path
        log.warning("cached dm-verity tree %s is damaged; fetching it again", path)
    except FileNotFoundError:
        pass
    if reader is None:
        raise SeedError(
            f"the dm-verity tree of {name} is not in the cache and no mirror is reachable",
            "boot once online first, so the cache gets the tree",
        )
    data = _fetch_compressed(name, v, reader)  # verified already
    if data is None:
        data = reader.get(tree_path(name, v.tree))
        if not is_tree(data, v):
            raise FormatError(
                f"dm-verity tree of {name} from {reader.location} does not match its signed digest",
                "the mirror is corrupt or tampered with; try another mirror",
            )
    write_atomic(path, data)
    return path


def _fetch_compressed(name: str, v: Verity, reader: Reader) -> bytes | None:
    """The verified tree from its ``.zst`` when one was published; None (fetch the plain tree)
    if any of that fails."""
    if not v.tree_zst_size:
        return None
    path = packed_tree_path(name, v.tree)
    try:
        return unpack_tree(reader.get(path), v)
    except (SeedError, ValueError) as e:
        log.warning("dm-verity tree %s from %s: %s; fetching the uncompressed tree", path, reader.location, e)
        return None


def unpack_tree(packed: bytes, v: Verity, whole: bool = False) -> bytes:
    """The signed tree from its ``.zst``; ValueError if the ``.zst`` is not the signed size or
    digest, does not decompress, or decompresses to anything but the signed tree.

    With the ``.zst``'s own digest signed (``Verity.tree_zst``), that digest is what is
    checked, and of the tree only its size and top block (cheap, and a publisher that signed
    two trees that disagree is caught there): the tree is 4.7 times the bytes to hash, ~0.1 s
    of a first boot under emulation. WHOLE hashes the tree too (``seedboot verify``)."""
    import zstandard

    if len(packed) != v.tree_zst_size:
        raise ValueError(f"{len(packed)} bytes, the metadata says {v.tree_zst_size}")
    if v.tree_zst and hashlib.sha256(packed).hexdigest() != v.tree_zst:
        raise ValueError("does not match its signed digest")
    try:
        data = zstandard.ZstdDecompressor().decompress(packed, max_output_size=v.tree_size)
    except zstandard.ZstdError as e:
        raise ValueError(f"does not decompress: {e}") from e
    if v.tree_zst and not whole:
        if len(data) != v.tree_size or not _top_matches(data[: v.hash_block_size], v):
            raise ValueError("does not decompress to the signed tree")
    elif not is_tree(data, v):
        raise ValueError("does not decompress to the signed tree")
    return data


@dataclass
class TreeFetch:
    """``fetch_tree`` in a thread: the blockdev stage starts it while it waits for the block
    daemon to come up, the root stage collects the tree (or the error) with ``wait``."""

    thread: threading.Thread
    tree: Path | None = None
    error: BaseException | None = None

    def wait(self) -> Path:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.tree is not None
        return self.tree


def fetch_tree_in_background(name: str, v: Verity, cache: Path, reader: Reader | None) -> TreeFetch:
    def run() -> None:
        try:
            job.tree = fetch_tree(name, v, cache, reader)
        except BaseException as e:  # handed to the root stage, which reports it
            job.error = e

    job = TreeFetch(threading.Thread(target=run, name="verity-tree", daemon=True))
    job.thread.start()
    return job


def setup_commands(v: Verity, data_dev: str, hash_dev: str, name: str = DM_NAME) -> list[list[str]]:
    """The same setup with the reference tool, dmsetup (for tests and rescue shells)."""
    return [
        ["dmsetup", "create", name, "--readonly", "--noudevsync", "--table", table(v, data_dev, hash_dev)],
        ["dmsetup", "mknodes", name],
    ]


def device_size(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def setup(v: Verity, data_dev: str, hash_dev: str, name: str = DM_NAME) -> str:
    """Create the read-only verity target over ``data_dev`` (the loop device) with the
    device-mapper ioctls (dm.py); returns its node, ``/dev/dm-N``.

    ``hash_dev`` is a (read-only loop) block device holding the tree."""
    from seedboot.agent import dm

    need = v.data_blocks * v.data_block_size
    have = device_size(data_dev)
    if have < need:
        raise SeedError(
            f"{data_dev} has {have} bytes, the dm-verity tree covers {need}",
            "the block device must present the image zero-padded to a multiple of 4096 bytes",
        )
    load_fast_hash(v.hash)
    _modprobe("dm-verity")
    params = table(v, data_dev, hash_dev).split(" ", 3)[3]
    try:
        dev = dm.create(name, "verity", need // 512, params)
    except OSError as e:
        raise SeedError(
            f"dm-verity over {data_dev} could not be set up: {e.strerror}",
            "is the dm-verity module in the miniroot? (dmesg says more)",
        ) from e
    log.info("dm-verity %s over %s (root hash %s)", dev, data_dev, v.root_hash[:16])
    return dev


def status(name: str = DM_NAME) -> str:
    """``V`` while every block read so far verified, ``C`` once corruption was seen."""
    from seedboot.agent import dm

    return dm.status(name).split()[-1]


def _modprobe(module: str) -> None:
    if os.path.isdir(f"/sys/module/{module.replace('-', '_')}"):
        return  # loaded (the hardware stage loads dm-verity in the background): no exec
    if shutil.which("modprobe"):
        subprocess.run(["modprobe", module], capture_output=True, timeout=TIMEOUT)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags (all CPUs of a virtual machine have the same)."""
    with open(cpuinfo) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return set(value.split())
    return set()


def load_fast_hash(algorithm: str, cpuinfo: str = "/proc/cpuinfo") -> None:
    module, needs = FAST_HASH.get(algorithm, ("", ()))
    try:
        flags = cpu_flags(cpuinfo)
    except OSError:
        return
    if module and flags.intersection(needs):
        _modprobe(module)


def hash_driver(algorithm: str, crypto: str = "/proc/crypto") -> str:
    """The implementation of ``algorithm`` the kernel gives a new user such as dm-verity (the
    one of highest priority), e.g. ``sha256-avx2``; empty if the kernel does not say."""
    best, best_prio = "", -1
    try:
        text = Path(crypto).read_text()
    except OSError:
        return ""
    for entry in text.split("\n\n"):
        fields = {}
        for line in entry.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        prio = fields.get("priority", "")
        if fields.get("name") == algorithm and prio.isdigit() and int(prio) > best_prio:
            best, best_prio = fields.get("driver", ""), int(prio)
    return best


def available() -> str:
    """Empty if this system can set up dm-verity, else why not (for the console line)."""
    if not os.path.exists("/dev/mapper/control"):
        _modprobe("dm-mod")
    if not os.path.exists("/dev/mapper/control"):
        return "no device-mapper in this kernel (dm-mod)"
    return ""


def unavailable(v: Verity, data_dev: str) -> str:
    """Why dm-verity cannot be set up over ``data_dev`` here, or "" if it can."""
    why = available()
    if not why and device_size(data_dev) < v.data_blocks * v.data_block_size:
        # The image is not a whole number of verity blocks; the block device shows it as is.
        why = f"the image is not a multiple of {v.data_block_size} bytes"
    return why


def protect(
    v: Verity | None,
    data_dev: str,
    attach: Callable[[Path], tuple[str, int]],
    fetched: TreeFetch | None,
) -> tuple[str, str]:
    """What the root stage calls between the loop device and the mount: returns the device
    to mount (the verity target, or ``data_dev`` when there is nothing to set up) and a note.

    ``attach`` makes a read-only, auto-clearing loop device of a file and returns it with an
    open fd (the root stage's ``attach_loop``); the fd is closed once the target holds it.
    ``fetched`` is the tree's fetch (``fetch_tree_in_background``), started when V is published."""
    if v is None:
        return data_dev, "no dm-verity tree published (agent block checks only)"
    why = unavailable(v, data_dev)
    if why:
        log.warning("dm-verity not set up: %s", why)
        return data_dev, f"dm-verity not set up: {why} (agent block checks only)"
    assert fetched is not None, "the root stage starts the tree's fetch whenever one is published"
    tree = fetched.wait()
    hash_dev, fd = attach(tree)
    try:
        dev = setup(v, data_dev, hash_dev)
    finally:
        os.close(fd)
    return dev, f"dm-verity {dev} ({hash_driver(v.hash) or v.hash}, root hash {v.root_hash[:16]}…)"
