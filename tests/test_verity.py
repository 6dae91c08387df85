"""dm-verity, publisher side: the tree published with an image verifies it with stock veritysetup.

The host kernel has no device-mapper, so the kernel-side check (agent/verity.setup) is
exercised in the QEMU boot tests; here ``veritysetup verify`` (user space, same tree format
and parameters as the kernel's dm-verity target) checks what the publisher signed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import zstandard

from seedboot.agent import metadata, release, signature
from seedboot.agent import verity as averity
from seedboot.agent.errors import FormatError
from seedboot.agent.reader import DirReader, HttpReader
from seedboot.tools import keys, publish
from seedboot.tools import verity as tverity
from tests.helpers import Nginx, have, keypair, make_ext4, make_tree

pytestmark = pytest.mark.skipif(not have("veritysetup"), reason="veritysetup (cryptsetup-bin) missing")
SEEDBOOT = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "seedboot")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("verity")
    make_tree(d / "src", big_mb=2)
    make_ext4(d / "src", d / "root.ext4", size_mb=24)
    keypair(d, "k")
    return d


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_publish_verity_round_trip(work: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "m"
    r = subprocess.run(
        [SEEDBOOT, "publish", str(work / "root.ext4"), "--mirror", str(mirror), "--name", "demo",
         "--key", str(work / "k.key")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # The agent's verified release carries the signed verity parameters.
    rel = release.open_release(DirReader(mirror), "demo", [signature.load_public_key(work / "k.pub")])
    v = rel.meta.verity
    assert v is not None and v.data_size == (work / "root.ext4").stat().st_size
    assert v.data_blocks * v.data_block_size == v.data_size and v.hash == "sha256"
    # A small ext4 has 1 KiB blocks (mke2fs "small"): dm-verity's data blocks follow it, or
    # the file system would not mount on the verity device (its logical blocks would be larger).
    assert v.data_block_size == tverity.fs_block_size(work / "root.ext4") == 1024
    tree = mirror / averity.tree_path("demo", v.tree)
    assert tree.stat().st_size == v.tree_size
    # Stock veritysetup verifies the image against the signed root hash...
    assert tverity.verify(work / "root.ext4", tree, v)
    # ...and fails on a single flipped byte in the middle of the image.
    bad = tmp_path / "bad.ext4"
    bad.write_bytes((work / "root.ext4").read_bytes())
    flip(bad, v.data_size // 2 + 123)
    assert not tverity.verify(bad, tree, v)
    # Or in the tree.
    bad_tree = tmp_path / "bad.tree"
    bad_tree.write_bytes(tree.read_bytes())
    flip(bad_tree, 100)
    assert not tverity.verify(work / "root.ext4", bad_tree, v)
    # --no-verity publishes metadata without the field.
    r = subprocess.run(
        [SEEDBOOT, "publish", str(work / "root.ext4"), "--mirror", str(tmp_path / "m2"), "--name", "demo",
         "--key", str(work / "k.key"), "--no-verity"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "verity" not in json.loads((tmp_path / "m2" / "demo" / "meta" / "1.json").read_text())


def test_unaligned_image_is_hashed_zero_padded(tmp_path: Path) -> None:
    image = tmp_path / "odd.img"
    image.write_bytes(os.urandom(3 * 4096 + 1000))
    v = tverity.build(image, tmp_path / "m", "odd")
    assert (v.data_size, v.data_blocks) == (3 * 4096 + 1000, 4)
    tree = tmp_path / "m" / averity.tree_path("odd", v.tree)
    assert tverity.verify(image, tree, v)  # verify pads the same way
    padded = tmp_path / "padded.img"
    padded.write_bytes(image.read_bytes() + bytes(4096 - 1000))
    assert tverity.verify(padded, tree, v)
    padded.write_bytes(image.read_bytes() + b"\1" + bytes(4096 - 1001))
    assert not tverity.verify(padded, tree, v)  # the padding is part of what is signed
    assert not list((tmp_path / "m").glob(".verity-tmp-*"))


def test_metadata_verity_field_is_validated(work: Path, tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(os.urandom(8192))
    v = tverity.build(image, tmp_path / "m", "x")
    meta = metadata.Metadata("x", 1, 0, 10, "a" * 64, 10, 8192, 65536, verity=v)
    assert metadata.parse(meta.to_json()).verity == v
    d = json.loads(meta.to_json())
    for key, bad in (
        ("hash", "md5"),
        ("data_blocks", 3),
        ("salt", "xyz"),
        ("root_hash", "00"),
        ("tree_zst", "zz"),
        ("tree_zst_size", 0),  # a .zst digest without a .zst
    ):
        broken = dict(d, verity=dict(d["verity"], **{key: bad}))
        with pytest.raises(FormatError):
            metadata.parse(json.dumps(broken).encode())
    with pytest.raises(FormatError, match="covers"):
        metadata.parse(json.dumps(dict(d, image_size=4096)).encode())
    # Metadata from before the .zst's digest was signed still parses (the agent then hashes
    # the tree it unpacks), and writes back without the field.
    older = dict(d, verity={k: x for k, x in d["verity"].items() if k != "tree_zst"})
    parsed = metadata.parse(json.dumps(older).encode())
    assert parsed.verity is not None and parsed.verity.tree_zst == ""
    assert b'tree_zst"' not in parsed.to_json()
    # Metadata without verity is byte-identical to the format before the field existed.
    plain = metadata.Metadata("x", 1, 0, 10, "a" * 64, 10, 8192, 65536)
    assert b"verity" not in plain.to_json()


def test_agent_fetches_and_checks_tree(  # type: ignore[no-untyped-def]
    work: Path, tmp_path: Path, nginx, caplog: pytest.LogCaptureFixture
) -> None:
    mirror, cache = tmp_path / "m", tmp_path / "cache"
    key = keys.load_secret_key(work / "k.key")
    publish.publish(work / "root.ext4", mirror, "demo", key, verity=True)
    srv: Nginx = nginx(mirror)
    reader = HttpReader(srv.url)
    rel = release.open_release(reader, "demo", [key.public_key])
    v = rel.meta.verity
    assert v is not None
    # The tree is published compressed too (its size signed): that is what the agent fetches.
    plain_tree = mirror / averity.tree_path("demo", v.tree)
    packed = plain_tree.with_name(plain_tree.name + ".zst")
    assert 0 < v.tree_zst_size == packed.stat().st_size < v.tree_size
    assert v.tree_zst == hashlib.sha256(packed.read_bytes()).hexdigest()
    plain_tree.rename(tmp_path / "aside")
    path = averity.fetch_tree("demo", v, cache, reader)
    assert path == cache / averity.tree_path("demo", v.tree)
    assert tverity.verify(work / "root.ext4", path, v)
    (tmp_path / "aside").rename(plain_tree)
    # A damaged .zst: the agent says so and takes the uncompressed tree instead.
    good = packed.read_bytes()
    packed.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    path.unlink()
    with caplog.at_level(logging.WARNING):
        averity.fetch_tree("demo", v, cache, reader)
    assert "fetching the uncompressed tree" in caplog.text
    assert tverity.verify(work / "root.ext4", path, v)
    # One that decompresses to the signed size but to other bytes: the same, whether the
    # metadata signs the .zst's digest (checked instead of hashing the whole tree), or is from
    # before that field (the tree is hashed), or signs the digest of a .zst of another tree
    # (a publisher's mistake: the top block does not hash to the signed root hash).
    other = zstandard.ZstdCompressor().compress(bytes(v.tree_size))
    packed.write_bytes(other)
    signed = dataclasses.replace(v, tree_zst_size=len(other))
    before = dataclasses.replace(signed, tree_zst="")
    mistaken = dataclasses.replace(signed, tree_zst=hashlib.sha256(other).hexdigest())
    for meta_v, why in (
        (signed, "does not match its signed digest"),
        (before, "does not decompress to the signed tree"),
        (mistaken, "does not decompress to the signed tree"),
    ):
        path.unlink()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            averity.fetch_tree("demo", meta_v, cache, reader)
        assert why in caplog.text and "fetching the uncompressed tree" in caplog.text
        assert tverity.verify(work / "root.ext4", path, v)
    packed.write_bytes(good)
    # gc keeps both forms of a kept version's tree.
    r = subprocess.run([SEEDBOOT, "gc", "--mirror", str(mirror)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert plain_tree.exists() and packed.exists()
    # Offline, the cached tree serves; a damaged cached tree is fetched again: one whose top
    # block does not hash to the signed root hash, or of another size.
    assert averity.fetch_tree("demo", v, cache, None) == path
    flip(path, 10)
    averity.fetch_tree("demo", v, cache, reader)
    assert tverity.verify(work / "root.ext4", path, v)
    whole = path.read_bytes()
    path.write_bytes(whole[:-4096])
    averity.fetch_tree("demo", v, cache, reader)
    assert path.read_bytes() == whole
    # Below the top block, the cached tree is not hashed again at boot: dm-verity checks each
    # of those blocks against its parent when it reads it (the QEMU test below shows the
    # kernel failing a read under a flipped byte there) and the daemon then removes the file.
    flip(path, v.tree_size - 1)
    assert averity.fetch_tree("demo", v, cache, None) == path
    assert not tverity.verify(work / "root.ext4", path, v)
    path.write_bytes(whole)
    # A tampered tree on the mirror is refused before the kernel ever sees it.
    flip(mirror / averity.tree_path("demo", v.tree), 10)
    packed.unlink()  # (as on a mirror published before the .zst)
    path.unlink()
    with pytest.raises(FormatError, match="does not match its signed digest"):
        averity.fetch_tree("demo", v, cache, reader)
    # The device-mapper table the guest uses, from signed values only.
    t = averity.table(v, "/dev/loop0", "/dev/loop1")
    assert t == (
        f"0 {v.data_blocks * 2} verity 1 /dev/loop0 /dev/loop1 1024 4096 {v.data_blocks} 0 sha256 "
        f"{v.root_hash} {v.salt}"
    )


def test_a_corrupt_hash_block_reported_by_dm_verity_removes_the_cached_tree(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The block daemon's answer to dm-verity's uevents (DM_VERITY_ERR_BLOCK_NR=KIND,N): a
    corrupt block of the hash tree removes the cached tree once, so the next boot fetches it
    again. The uevents come from a real kernel only in a guest (this host has no
    device-mapper), so the handler is called as the uevent thread calls it."""
    import types

    from seedboot.agent.daemon import verity_error_handler
    from seedboot.agent.localcopy import VERITY_DATA, VERITY_METADATA

    tree = tmp_path / "tree"
    tree.write_bytes(b"t" * 8192)
    dev = types.SimpleNamespace(index=types.SimpleNamespace(block_size=256 * 1024))
    on_error = verity_error_handler(None, dev, 4096, tree)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        on_error(VERITY_DATA, 7)  # a data block, and no local copy to mend: the tree stays
        assert tree.exists() and not caplog.text
        on_error(VERITY_METADATA, 3)
        assert not tree.exists()
        assert f"hash block 3 of {tree} is corrupt: removed; the next boot fetches it" in caplog.text
        caplog.clear()
        on_error(VERITY_METADATA, 4)  # the same tree's next bad block: nothing more to do
        assert not caplog.text


# --- the kernel side, in a QEMU guest (the host kernel has no device-mapper) -------------
#
# One boot per disk state runs both: dmsetup (the reference tool) with the table
# agent/verity.py builds, then the agent itself (frozen, as in the miniroot), which sets the
# target up through the device-mapper ioctls (agent/dm.py) and reads the whole device.

REFERENCE = """export DM_DISABLE_UDEV=1
{setup}
echo "SEEDTEST-SETUP-RC=$?"
sha256sum /dev/mapper/ref > /tmp/sum; echo "SEEDTEST-READ-RC=$?"
echo "SEEDTEST-SHA=$(cut -d' ' -f1 /tmp/sum)"
echo "SEEDTEST-STATUS=$(dmsetup status ref)"
dmsetup remove ref
"""


@pytest.mark.qemu
@pytest.mark.skipif(
    not (have("qemu-system-x86_64") and have("dmsetup") and have("cpio")), reason="qemu/dmsetup/cpio"
)
def test_kernel_dm_verity_catches_a_flipped_byte(tmp_path: Path) -> None:
    """The table agent/verity.py builds, loaded by a real kernel, by dmsetup and by the agent's
    own ioctls: intact reads pass bit-exact, one flipped byte in the data disk is an I/O error
    (never bad data), and the target says 'C'."""
    import dataclasses
    import shlex

    from tests import guest

    data = tmp_path / "data.img"
    data.write_bytes(os.urandom(4 * 1024 * 1024))
    v = tverity.build(data, tmp_path / "m", "demo")
    tree = tmp_path / "m" / averity.tree_path("demo", v.tree)
    tree_disk = tmp_path / "tree.img"  # a block device's size is whole sectors
    tree_disk.write_bytes(tree.read_bytes().ljust(-(-v.tree_size // 512) * 512, b"\0"))
    setup = " && ".join(shlex.join(c) for c in averity.setup_commands(v, "/dev/vda", "/dev/vdb", name="ref"))
    initrd = guest.initrd(
        tmp_path / "initrd.img",
        modules=("virtio_pci", "virtio_blk", "dm-verity"),
        files={"verity.json": json.dumps(dataclasses.asdict(v))},
        before=REFERENCE.format(setup=setup),
        dmsetup=True,
    )

    want = hashlib.sha256(data.read_bytes()).hexdigest()
    ok = guest.boot(initrd, "seedtest=verity", (data, tree_disk))
    assert ok["SEEDTEST-SETUP-RC"] == "0" and ok["SEEDTEST-READ-RC"] == "0"
    assert ok["SEEDTEST-SHA"] == want and ok["SEEDTEST-STATUS"].split()[-1] == "V"
    assert ok["SEEDTEST-AGENT-DEV"].startswith("/dev/dm-")
    assert ok["SEEDTEST-AGENT-SHA"] == want and ok["SEEDTEST-AGENT-STATUS"] == "V"

    flip(data, 3 * 1024 * 1024 + 5)
    bad = guest.boot(initrd, "seedtest=verity", (data, tree_disk))
    assert bad["SEEDTEST-SETUP-RC"] == "0"
    assert bad["SEEDTEST-READ-RC"] != "0"  # EIO, not the altered bytes
    assert bad["SEEDTEST-STATUS"].split()[-1] == "C"
    assert bad["SEEDTEST-AGENT-READ-ERRNO"] == "5" and "SEEDTEST-AGENT-SHA" not in bad
    assert bad["SEEDTEST-AGENT-STATUS"] == "C"

    # A flipped byte below the tree's top block (the only one the root stage checks in a
    # cached tree, agent/verity.top_matches): the same, the kernel checks that level itself.
    flip(data, 3 * 1024 * 1024 + 5)
    flip(tree_disk, v.hash_block_size + 100)
    assert averity.top_matches(tree_disk, dataclasses.replace(v, tree_size=tree_disk.stat().st_size))
    worse = guest.boot(initrd, "seedtest=verity", (data, tree_disk))
    assert worse["SEEDTEST-SETUP-RC"] == "0" and worse["SEEDTEST-READ-RC"] != "0"
    assert worse["SEEDTEST-STATUS"].split()[-1] == "C"
    assert worse["SEEDTEST-AGENT-READ-ERRNO"] == "5" and worse["SEEDTEST-AGENT-STATUS"] == "C"


def test_the_kernels_sha256_implementation_is_the_one_of_highest_priority(tmp_path: Path) -> None:
    """What the root stage's line names: the driver dm-verity gets (the highest priority one
    of the algorithm), as /proc/crypto lists them (excerpt of a Debian 6.1 guest's, with SSSE3)."""
    from seedboot.agent.verity import cpu_flags, hash_driver

    crypto = tmp_path / "crypto"
    crypto.write_text(
        "name         : sha256\ndriver       : sha256-ssse3\nmodule       : sha256_ssse3\n"
        "priority     : 150\nrefcnt       : 1\nselftest     : passed\ninternal     : no\n"
        "type         : shash\nblocksize    : 64\ndigestsize   : 32\n\n"
        "name         : sha224\ndriver       : sha224-ssse3\nmodule       : sha256_ssse3\n"
        "priority     : 300\ntype         : shash\n\n"
        "name         : sha256\ndriver       : sha256-generic\nmodule       : kernel\n"
        "priority     : 100\ntype         : shash\n\n"
    )
    assert hash_driver("sha256", str(crypto)) == "sha256-ssse3"
    assert hash_driver("blake2b-256", str(crypto)) == ""
    assert hash_driver("sha256", str(tmp_path / "absent")) == ""
    assert "fpu" in cpu_flags()  # this host's own CPU
