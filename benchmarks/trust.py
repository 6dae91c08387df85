"""What the chain of trust costs a boot: dm-verity and TPM measurement, each on and off.

The same root image (busybox + a random payload), published with and without a dm-verity
tree, booted in QEMU (software emulation) from a fresh cache disk, with and without swtpm.
For each configuration: the trust stage and root stage times the agent prints, the time to
the root's marker, and the time the booted root takes to read the payload (through the
overlay, dm-verity if on, the loop device and the FUSE block device, from the cache filled
during the boot... or the mirror). Runs are interleaved so other load spreads over all
configurations; the table shows medians and the ratio to the baseline (no verity, no TPM)
measured in the same process.

    .venv/bin/python -m benchmarks.trust [--runs 2] [--payload-mb 16]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from seedboot.tools import keys, publish
from tests import artifacts
from tests.helpers import Nginx
from tests.qemu import Disk, Guest, swtpm_device

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
[ -r /proc/mounts ] || mount -t proc proc /proc
t0=$(cut -d' ' -f1 /proc/uptime)
cat /data/payload > /dev/null
t1=$(cut -d' ' -f1 /proc/uptime)
echo "BENCH-READ-S=$(echo "$t1 $t0" | awk '{print $1 - $2}')"
echo BENCH-ROOT-OK
poweroff -f
"""


@dataclass
class Config:
    name: str
    verity: bool
    tpm: bool
    samples: dict[str, list[float]] = field(default_factory=dict)


def build_root(work: Path, payload_mb: int) -> Path:
    tree = work / "root"
    for sub in ("bin", "sbin", "data", "dev", "proc", "sys", "run", "tmp"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", tree / "bin" / "busybox")
    (tree / "sbin" / "init").write_text(INIT)
    (tree / "sbin" / "init").chmod(0o755)
    (tree / "data" / "payload").write_bytes(os.urandom(payload_mb * 1024 * 1024))
    image = work / "root.ext4"
    size = payload_mb + 24
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(tree), str(image), f"{size}M"],
        check=True,
    )
    return image


def stage_seconds(console: str, stage: str) -> float:
    m = re.search(rf"seedboot: {stage} +ok +([0-9.]+)s", console)
    return float(m.group(1)) if m else float("nan")


def boot_once(cfg: Config, work: Path, initrd: Path, url: str, run: int) -> dict[str, float]:
    cache = work / "cache.img"
    cache.unlink(missing_ok=True)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "KNXBLOCK", str(cache), "256M"], check=True)
    with ExitStack() as stack:
        extra: list[str] = []
        if cfg.tpm:
            state = work / f"tpm-{cfg.name}-{run}"
            state.mkdir()
            extra = stack.enter_context(swtpm_device(state, work / "swtpm.sock"))
        guest = Guest(
            log=work / f"{cfg.name}-{run}.log",
            kernel=artifacts.kernel_dir() / "vmlinuz",
            initrd=initrd,
            append=f"seed.name=bench seed.mirrors={url} seed.rescue=reboot",
            disks=[Disk(cache)],
            extra=extra,
            watchdog=600,
        )
        t0 = time.monotonic()
        with guest:
            guest.expect(r"BENCH-ROOT-OK", timeout=500)
            marker = time.monotonic() - t0
            guest.wait_exit(60)
    c = guest.console()
    read = re.search(r"BENCH-READ-S=([0-9.]+)", c)
    return {
        "trust stage s": stage_seconds(c, "trust"),
        "root stage s": stage_seconds(c, "root"),
        "to marker s": marker,
        "payload read s": float(read.group(1)) if read else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--payload-mb", type=int, default=16)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="seedboot-bench-trust-"))
    key, pub = artifacts.signing_keypair("test")
    initrd = artifacts.initramfs([pub])
    image = build_root(work, args.payload_mb)
    sk = keys.load_secret_key(key)
    mirrors = {True: work / "mirror-verity", False: work / "mirror-plain"}
    for verity, mirror in mirrors.items():
        publish.publish(image, mirror, "bench", sk, verity=verity)
    servers = {v: Nginx(root=m, workdir=work / f"nginx-{v}").start() for v, m in mirrors.items()}
    configs = [
        Config("baseline", False, False),
        Config("verity", True, False),
        Config("tpm", False, True),
        Config("verity+tpm", True, True),
    ]
    try:
        for run in range(args.runs):
            for cfg in configs:
                url = f"http://10.0.2.2:{servers[cfg.verity].port}"
                for k, v in boot_once(cfg, work, initrd, url, run).items():
                    cfg.samples.setdefault(k, []).append(v)
                print(f"run {run + 1}/{args.runs} {cfg.name}: done", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    base = {k: statistics.median(v) for k, v in configs[0].samples.items()}
    print(f"\n{'config':<12}" + "".join(f"{k:>24}" for k in base))
    for cfg in configs:
        cells = []
        for k, samples in cfg.samples.items():
            med = statistics.median(samples)
            cells.append(f"{med:9.2f} ({med / base[k]:4.2f}x)" if base[k] else f"{med:9.2f}")
        print(f"{cfg.name:<12}" + "".join(f"{c:>24}" for c in cells))
    print(f"\n{args.runs} run(s) each, medians; ratio to the baseline in this process. Logs: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
