"""Start-up cost of the boot agent (issue 4): where the miniroot's time goes, stage by stage.

    .venv/bin/python -m benchmarks.agent_startup [--runs 3]

Boots in QEMU (software emulation, -smp 1, -m 512), alternating, ``--runs`` times each:

  baseline  the same kernel with a tiny busybox initramfs whose /init prints a line and
            powers off: what the kernel itself costs up to running /init;
  seedboot  the real miniroot, offline from a filled cache disk (``seed.offline``, so no
            network wait blurs it), to the switch into the demo root.

Prints, as medians: when the kernel ran /init (both), the agent's first line, each stage, the
switch, and the agent's own time (switch minus /init) as a ratio to the baseline's kernel
time. Timestamps come from the guest's own lines (the kernel's clock), not the host's.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from seedboot.agent import cmdline
from seedboot.tools import cpio, keys, publish
from tests import artifacts
from tests.helpers import Nginx
from tests.qemu import Disk, Guest

BASELINE_INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "BASELINE-INIT $(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox poweroff -f
"""
STAGE = re.compile(r"\[\s*([\d.]+)s\] seedboot: (\w+)\s+ok\s+([\d.]+)s")
UP = re.compile(r"\[\s*([\d.]+)s\] seedboot: agent \S+ up at [\d.]+s \(kernel ran /init at ([\d.]+)s\)")
SWITCH = re.compile(r"switch at ([\d.]+)s")
BASE = re.compile(r"BASELINE-INIT ([\d.]+)")


def baseline_initrd(out: Path) -> Path:
    raw = io.BytesIO()
    entries = [
        cpio.directory("bin"),
        cpio.directory("proc"),
        cpio.directory("dev"),
        cpio.chardev("dev/console", 5, 1),
        cpio.file("bin/busybox", Path(shutil.which("busybox") or "/bin/busybox").read_bytes(), 0o755),
        cpio.file("init", BASELINE_INIT, 0o755),
    ]
    cpio.write(raw, entries)
    out.write_bytes(raw.getvalue())
    return out


def cache_disk(path: Path) -> Path:
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "KNXBLOCK", str(path), "160M"], check=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    key, pub = artifacts.signing_keypair("test")
    kernel = artifacts.kernel_dir() / "vmlinuz"
    initrd = artifacts.initramfs([pub])
    image = artifacts.demo_root(size_mb=48, data_mb=16)
    with tempfile.TemporaryDirectory(prefix="agent-startup-") as tmp_s:
        tmp = Path(tmp_s)
        publish.publish(image, tmp / "mirror", "demo", keys.load_secret_key(key), version=1)
        nginx = Nginx(root=tmp / "mirror", workdir=tmp / "nginx").start()
        disk = cache_disk(tmp / "cache.img")
        try:
            with Guest(
                log=tmp / "fill.log",
                kernel=kernel,
                initrd=initrd,
                append=f"seed.name=demo seed.rescue=reboot seed.mirrors=http://10.0.2.2:{nginx.port}",
                disks=[Disk(disk)],
            ) as g:
                g.expect("SEEDBOOT-DEMO-OK", timeout=300)
        finally:
            nginx.stop()
        base_initrd = baseline_initrd(tmp / "baseline.cpio")
        base: list[float] = []
        runs: list[dict[str, float]] = []
        for i in range(args.runs):
            with Guest(log=tmp / f"base{i}.log", kernel=kernel, initrd=base_initrd) as g:
                m = g.expect(r"BASELINE-INIT ([\d.]+)", timeout=120)
                base.append(float(m.group(1)))
            with Guest(
                log=tmp / f"seed{i}.log",
                kernel=kernel,
                initrd=initrd,
                append="seed.name=demo seed.rescue=reboot seed.offline",
                disks=[Disk(disk)],
            ) as g:
                g.expect("SEEDBOOT-DEMO-OK", timeout=300)
                console = g.console()
            up = UP.search(console)
            sw = SWITCH.search(console)
            if not up or not sw:
                raise SystemExit(f"run {i}: no agent/switch line; see {g.log}")
            r = {"init": float(up.group(2)), "up": float(up.group(1)), "switch": float(sw.group(1))}
            for m in STAGE.finditer(console):
                r[f"stage:{m.group(2)}"] = float(m.group(3))
            runs.append(r)
            print(
                f"run {i + 1}: baseline /init at {base[-1]:.2f}s; seedboot switch at {r['switch']:.2f}s",
                flush=True,
            )

    for r in runs:
        r["up-init"] = r["up"] - r["init"]
        r["agent"] = r["switch"] - r["init"]

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs)

    def low(key: str) -> float:
        return min(r.get(key, 0.0) for r in runs)

    # The guest's clock follows the host's: on a shared host every figure swells with the other
    # load, so the minimum (the least disturbed run) is printed next to the median.
    kernel_base = statistics.median(base)
    print(f"\n{args.runs} runs (software emulation, -smp 1); seconds since kernel start: median (min)")
    print(f"  baseline: tiny initramfs, /init at          {kernel_base:6.2f} ({min(base):.2f})")
    print(f"  seedboot: kernel ran /init at               {med('init'):6.2f} ({low('init'):.2f})")
    print(f"            /init -> agent's first line       {med('up-init'):6.2f} ({low('up-init'):.2f})")
    for stage in cmdline.STAGE_NAMES[:-1]:
        name = "stage:" + stage
        print(f"            {stage:<9} took                   {med(name):6.2f} ({low(name):.2f})")
    agent = med("agent")
    print(f"            switch at                         {med('switch'):6.2f} ({low('switch'):.2f})")
    print(
        f"  agent (switch - /init): {agent:.2f}s ({low('agent'):.2f}) = "
        f"{agent / kernel_base:.2f}x the kernel's own time to /init"
    )
    print(f"  initramfs hand-off cost (seedboot /init - baseline /init): {med('init') - kernel_base:+.2f}s")
    print(f"  initramfs: {initrd.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
