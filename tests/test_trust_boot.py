"""The chain of trust in whole boots: seed disk trusting only the root key, swtpm attached.

One mirror (nginx), one cache disk and one TPM state carried across the boots, as one
machine would: measurement into PCR 15 checked from inside the booted root, dm-verity under
the root mount, a replayed older version refused (and booted when chosen), a rotated signing
key booting with the same initramfs, a revoked one refused, a block altered on the cache
partition while the machine was off caught, and a boot without a TPM going on with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from seedboot.agent import index as indexmod
from seedboot.agent import layout
from seedboot.tools import keyring_tools, keys, publish
from tests import artifacts
from tests.helpers import Nginx, have, keypair
from tests.qemu import Disk, Guest, swtpm_device

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.root,  # the cache disk is tampered with through a loop mount
    pytest.mark.skipif(not (have("swtpm") and have("qemu-system-x86_64")), reason="swtpm/qemu missing"),
]

ROOT_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
[ -r /proc/mounts ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
echo "TRUST-PCR15=$(cat /sys/class/tpm/tpm0/pcr-sha256/15 2>/dev/null || echo none)"
echo "TRUST-LOG=$(tail -n 1 /run/log/seedboot/tpm2-measure.log 2>/dev/null || echo none)"
echo "TRUST-DM=$(cat /sys/block/dm-*/dm/name 2>/dev/null | sort | tr '\n' ' ')"
echo "TRUST-DROPPED=$(grep -c 'dropping block' /run/seedboot/blockdev.log 2>/dev/null)"
sha256sum /data/payload | cut -d' ' -f1 | sed 's/^/TRUST-PAYLOAD=/'
echo TRUST-ROOT-OK
sleep 1  # the block daemon's last writes (a real shutdown gives it that time too)
sync
poweroff -f
"""


@dataclass
class Machine:
    """One machine across boots: its cache disk and TPM state; the mirror it boots from."""

    dir: Path
    mirror: Path
    nginx: Nginx
    initrd: Path
    cache: Path
    tpm_state: Path
    root_key: Path
    payload_sha: str
    boots: int = 0

    @property
    def url(self) -> str:
        return f"http://10.0.2.2:{self.nginx.port}"  # the host's loopback, from the guest

    def boot(
        self, append: str = "", tpm: bool = True, expect: str = r"TRUST-ROOT-OK", cpu: str = Guest.cpu
    ) -> str:
        """Boot until the guest powers off; the console. Fails unless EXPECT shows up."""
        self.boots += 1
        with ExitStack() as stack:
            extra = stack.enter_context(swtpm_device(self.tpm_state, self.dir / "swtpm.sock")) if tpm else []
            guest = Guest(
                log=self.dir / f"boot-{self.boots}.log",
                kernel=artifacts.kernel_dir() / "vmlinuz",
                initrd=self.initrd,
                append=f"seed.name=demo seed.mirrors={self.url} seed.rescue=reboot {append}",
                disks=[Disk(self.cache)],
                extra=extra,
                watchdog=400,
                cpu=cpu,
            )
            with guest:
                guest.expect(expect, timeout=300)
                guest.wait_exit(120)
        return guest.console()


def field(console: str, key: str) -> str:
    m = re.search(rf"^{key}=(.*?)\r?$", console, re.M)
    assert m, f"{key} not on the console:\n{console[-3000:]}"
    return m.group(1).strip()


def meta_digest(mirror: Path, version: int) -> str:
    return hashlib.sha256((mirror / layout.meta_path("demo", version)).read_bytes()).hexdigest()


def pcr_after(*digests: str) -> str:
    pcr = bytes(32)
    for d in digests:
        pcr = hashlib.sha256(pcr + bytes.fromhex(d)).digest()
    return pcr.hex()


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    d = tmp_path_factory.mktemp("trustboot")
    root_key, root_pub = artifacts.signing_keypair("test")
    initrd = artifacts.initramfs([root_pub])
    tree = d / "root"
    (tree / "bin").mkdir(parents=True)
    (tree / "sbin").mkdir()
    (tree / "data").mkdir()
    for sub in ("dev", "proc", "sys", "run", "tmp"):
        (tree / sub).mkdir()
    shutil.copy(shutil.which("busybox") or "/bin/busybox", tree / "bin" / "busybox")
    (tree / "sbin" / "init").write_text(ROOT_INIT)
    (tree / "sbin" / "init").chmod(0o755)
    payload = os.urandom(2 * 1024 * 1024)
    (tree / "data" / "payload").write_bytes(payload)
    image = d / "root.ext4"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "trustroot", "-d", str(tree), str(image), "24M"],
        check=True,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    mirror = d / "mirror"
    key = keys.load_secret_key(root_key)
    for v in (1, 2):
        publish.publish(image, mirror, "demo", key, version=v, block_size=64 * 1024, verity=True)
    cache = d / "cache.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "KNXBLOCK", str(cache), "96M"], check=True)
    tpm_state = d / "tpm"
    tpm_state.mkdir()
    srv = Nginx(root=mirror, workdir=d / "nginx").start()
    try:
        yield Machine(d, mirror, srv, initrd, cache, tpm_state, root_key, hashlib.sha256(payload).hexdigest())
    finally:
        srv.stop()


def tamper_cached_block(cache_img: Path, digest: str, workdir: Path) -> None:
    """Overwrite one cached block file on the cache disk while the machine is off, as someone
    with the disk in hand could. A real mount (not debugfs): the guest powered off without
    unmounting, so the journal must be replayed first, or it would undo the change."""
    mnt = workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(cache_img), str(mnt)], check=True)
    try:
        block = mnt / layout.block_path(digest)
        assert block.is_file(), f"block {digest} is not in the cache"
        block.write_bytes(os.urandom(block.stat().st_size))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def tamper_local_copy(m: Machine, version: int) -> None:
    """Overwrite 4 KiB in the middle of /data/payload's bytes in the local copy on the cache
    disk (a real mount: the journal of the unclean power-off is replayed first)."""
    image = (m.dir / "root.ext4").read_bytes()
    payload = (m.dir / "root" / "data" / "payload").read_bytes()
    payload_at = image.find(payload[:4096])
    assert payload_at > 0 and image[payload_at : payload_at + len(payload)] == payload
    index = json.loads((m.mirror / layout.meta_path("demo", version)).read_text())["index"]
    mnt = m.dir / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(m.cache), str(mnt)], check=True)
    try:
        copy = mnt / "demo" / "copy" / f"{index}.img"
        assert copy.is_file(), "no local copy on the cache disk"
        with copy.open("r+b") as f:
            f.seek(payload_at + 1024 * 1024)
            f.write(os.urandom(4096))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_trust_chain_across_boots(machine: Machine) -> None:
    m = machine
    # 1. Latest (v2, root-signed): measured into PCR 15, root under dm-verity.
    #    The CPU has SSSE3, as any hypervisor's has: dm-verity hashes with the kernel's fast sha256.
    c = m.boot(cpu=f"{Guest.cpu},+ssse3")
    assert re.search(r"root +ok .*dm-verity /dev/dm-\d \(sha256-ssse3, root hash [0-9a-f]{16}", c), c[-3000:]
    assert field(c, "TRUST-PCR15").lower() == pcr_after(meta_digest(m.mirror, 2))
    event = json.loads(field(c, "TRUST-LOG"))
    assert event["description"] == f"seedboot:demo:2:{meta_digest(m.mirror, 2)}" and event["pcr"] == 15
    # dm-verity's device; under it the local copy's, if the daemon copied a block (the loop
    # device's partition scan reads one) before the root stage looked
    names = field(c, "TRUST-DM").split()
    assert "seedroot" in names and set(names) <= {"seedmix", "seedroot"}, names
    assert field(c, "TRUST-PAYLOAD") == m.payload_sha
    assert re.search(r"trust +ok .*signed by root key", c)

    # 1b. The payload's bytes in the local copy are altered while the machine is off: the
    #     copy is used again, dm-verity fails the altered block's read (never serves it), the
    #     daemon drops it from the copy's map and copies it again; the next boot is whole.
    tamper_local_copy(m, 2)
    c = m.boot()
    assert re.search(r"root +ok .*; \d+ of \d+ blocks \(\d+ MiB\) from the local copy", c), c[-3000:]
    assert re.search(r"device-mapper: verity: .*: data block \d+ is corrupted", c), c[-3000:]
    assert "can't read '/data/payload': Input/output error" in c and m.payload_sha not in c
    c = m.boot()
    assert field(c, "TRUST-PAYLOAD") == m.payload_sha
    assert "is corrupted" not in c

    # 2. The mirror replays v1 (its latest pointer wound back): refused, with the reason.
    (m.mirror / layout.latest_path("demo")).write_text("1\n")
    c = m.boot(expect=r"seedboot: trust +FAILED")
    assert "version 1 is older than version 2 seen before" in c
    assert "TRUST-ROOT-OK" not in c

    # 3. The user picks v1 from the menu: it boots and says so; PCR 15 names v1.
    c = m.boot("seed.version=1")
    assert "booting older version 1 of demo as requested (highest seen is 2)" in c
    assert "(sha256-generic, root hash" in c, "QEMU's plain qemu64 CPU: the generic code, and no failed load"
    assert field(c, "TRUST-PCR15").lower() == pcr_after(meta_digest(m.mirror, 1))

    # 4. A new signing key, vouched for by the root key: v3 boots with the same initramfs.
    #    Meanwhile a block on the cache partition was altered (machine off), and there is no TPM.
    ka, _ = keypair(m.dir, "signer-a")
    keyring_tools.rotate(m.mirror, keys.load_secret_key(m.root_key), [keys.load_secret_key(ka).public_key])
    v3 = publish.publish(
        m.dir / "root.ext4", m.mirror, "demo", keys.load_secret_key(ka), block_size=64 * 1024, verity=True
    ).version
    idx = indexmod.decode((m.mirror / layout.index_path("demo", json.loads(
        (m.mirror / layout.meta_path("demo", v3)).read_text())["index"])).read_bytes())  # fmt: skip
    tamper_cached_block(m.cache, idx.digest_hex(0), m.dir)
    c = m.boot(tpm=False)
    signer = keys.load_secret_key(ka).public_key.id_str
    assert f"signed by key {signer}, listed in keys statement version 1" in c
    assert "no TPM (/dev/tpmrm0 absent): image not measured, continuing" in c
    assert field(c, "TRUST-PCR15") == "none"
    assert int(field(c, "TRUST-DROPPED")) >= 1 and field(c, "TRUST-PAYLOAD") == m.payload_sha

    # 5. The signing key is revoked: the same v3 is refused, naming key and statement.
    keyring_tools.revoke(m.mirror, keys.load_secret_key(m.root_key), signer)
    c = m.boot(expect=r"seedboot: trust +FAILED")
    assert f"signed by key {signer}, revoked by keys statement version 2" in c
