"""A small busybox root file system whose init proves where it runs (the boot tests' payload).

Its ``/sbin/init`` checks the SHA-256 of a large incompressible file against the manifest in the
image (so the blocks really stream), writes a file and reads it back (so / is writable: the
overlay), prints one marker line and powers off::

    SEEDBOOT-DEMO-OK sha256=ok overlay=ok root=<source of /> fstype=<type of /> uptime=<s>
    SEEDBOOT-DEMO-FAIL <what>

Built with ``mke2fs -d`` (no root needed); same size and data give the same file contents.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent.errors import SeedError
from seedboot.tools.command import run

log = logging.getLogger(__name__)

MARKER_OK = "SEEDBOOT-DEMO-OK"
MARKER_FAIL = "SEEDBOOT-DEMO-FAIL"
BIG_FILE = "data/big.bin"
MANIFEST = "etc/seedboot-demo/manifest"
LABEL = "seeddemo"
UUID = "5eedb007-0000-4000-8000-00000000de70"
FIXED_TIME = 1167609600  # 2007-01-01, the VMSeed era

INIT = r"""#!/bin/sh
# seedboot demo root: prove the streamed root works, print one marker line, power off.
export PATH=/sbin:/bin
fail() { echo "SEEDBOOT-DEMO-FAIL $*"; sync; poweroff -f; exit 1; }
# The agent moves /proc /sys /dev /run in; mount what is missing (a direct disk boot).
[ -r /proc/mounts ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs dev /dev
echo "seedboot-demo: init started at $(cut -d' ' -f1 /proc/uptime)s"
root=$(awk '$2 == "/" { src = $1; type = $3 } END { print src " " type }' /proc/mounts)
want=$(cut -d' ' -f1 /etc/seedboot-demo/manifest)
got=$(sha256sum /data/big.bin | cut -d' ' -f1)
[ -n "$got" ] || fail "cannot read /data/big.bin"
[ "$got" = "$want" ] || fail "sha256 of /data/big.bin is $got, manifest says $want"
stamp="written by pid $$ at $(cut -d' ' -f1 /proc/uptime)"
echo "$stamp" > /var/seedboot-demo-write || fail "cannot write to / (root=$root)"
sync
[ "$(cat /var/seedboot-demo-write)" = "$stamp" ] || fail "file written to / reads back wrong"
for f in $(cat /etc/seedboot-demo/extra 2>/dev/null); do
    [ -r "$f" ] || fail "cannot read $f"
done
# Storage daemons (argv[0] beginning with @) are what systemd spares at shutdown.
for c in /proc/[0-9]*/cmdline; do
    n=$(tr '\0' '\n' < "$c" 2>/dev/null | head -n 1)
    case "$n" in @*) p=${c#/proc/}; echo "seedboot-demo: storage daemon $n pid ${p%/cmdline}" ;; esac
done
# The block daemon's local copy (seedboot.agent.localcopy): how often it swapped in blocks copied
st=/run/seedboot/blockdev/status.json
[ -r $st ] && echo "seedboot-demo: local copy $(tr -d '\n ' < $st | grep -o '"copy":{[^}]*}')"
up=$(cut -d' ' -f1 /proc/uptime)
echo "SEEDBOOT-DEMO-OK sha256=ok overlay=ok root=${root% *} fstype=${root#* } uptime=$up"
# With seed.debug, show the block daemon's log (it lives in /run, gone after power-off).
if grep -qw seed.debug /proc/cmdline && [ -r /run/seedboot/blockdev.log ]; then
    sed 's/^/blockdev.log: /' /run/seedboot/blockdev.log
fi
# The block daemon writes what it still holds and leaves the cache partition clean
# (what the systemd unit does on a systemd root: agent/quiesce.py).
[ -x /run/seedboot/quiesce ] && /run/seedboot/quiesce
sync
poweroff -f
"""


@dataclass(frozen=True)
class DemoRoot:
    image: Path
    size_mb: int
    data_mb: int
    sha256: str


def busybox() -> Path:
    path = shutil.which("busybox")
    if path is None:
        raise SeedError("busybox not found", hint="apt-get install busybox-static")
    return Path(path)


def big_data(size: int, seed: int = 2006) -> bytes:
    """SIZE bytes that no compressor shrinks, the same for the same size and seed."""
    return random.Random(seed).randbytes(size)


def populate(tree: Path, data_mb: int) -> str:
    """Lay out the root in TREE; returns the big file's SHA-256."""
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "var", "root", "mnt", "data"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    bb = busybox()
    shutil.copy2(bb, tree / "bin" / "busybox")
    applets = run([str(bb), "--list"]).split()
    for name in applets:
        if name != "busybox":
            (tree / "bin" / name).symlink_to("busybox")
    init = tree / "sbin" / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    data = big_data(data_mb * 1024 * 1024)
    (tree / BIG_FILE).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (tree / MANIFEST).parent.mkdir(parents=True)
    (tree / MANIFEST).write_text(f"{digest}  /{BIG_FILE}\n")
    (tree / "etc" / "hostname").write_text("seedboot-demo\n")
    (tree / "etc" / "os-release").write_text('NAME="seedboot demo root"\nID=seedboot-demo\n')
    for p in [tree, *tree.rglob("*")]:
        os.utime(p, (FIXED_TIME, FIXED_TIME), follow_symlinks=False)
    return digest


def build(out: Path, size_mb: int = 128, data_mb: int = 64) -> DemoRoot:
    if data_mb < 1 or size_mb < data_mb + 8:
        raise SeedError(
            f"a {size_mb} MB image cannot hold {data_mb} MB of data", hint="give --size at least --data + 8"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".demo-root-") as tmp_s:
        tree = Path(tmp_s) / "tree"
        digest = populate(tree, data_mb)
        tmp_img = Path(tmp_s) / "root.img"
        with tmp_img.open("wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        # Fixed UUID, hash seed and time: the same inputs give (nearly) the same image.
        cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", LABEL, "-U", UUID, "-E", f"hash_seed={UUID}"]
        run([*cmd, "-d", str(tree), str(tmp_img)], env={"E2FSPROGS_FAKE_TIME": str(FIXED_TIME)})
        tmp_img.replace(out)
    log.info("demo root %s: %d MB ext4, %d MB data, sha256 %s", out, size_mb, data_mb, digest[:16])
    return DemoRoot(out, size_mb, data_mb, digest)
