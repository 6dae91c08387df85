"""The HTTP block device against a direct loop mount of the same image, in one run.

    .venv/bin/python -m benchmarks.blockdev [--size-mb 256] [--runs 3] [--conns 64]

A >= 256 MiB file of real binaries (from /usr, so it compresses like an OS does) sits in an
ext4 image, published to a mirror that nginx serves. Each case reads that file sequentially
inside the mounted filesystem (loop device with direct I/O, ext4 read-only), page cache
dropped first:

- direct: the image file itself on a loop device (the baseline);
- cold, through the latency proxy at 0 ms and at 100 ms RTT, with ``--prefetch off`` and
  with ``--prefetch all`` (fresh cache each time);
- warm: everything in the cache, no network.

Targets: warm / direct >= 0.7; cold@100ms / cold@0ms >= 0.5. Also the daemon's peak
resident memory (target <= 64 MB) and warm random 4 KiB read latency. The machine is
shared: every figure is the median of ``--runs`` runs with their min and max. The daemon's
CPU seconds per GB read do not depend on the load as much as MB/s do: on a busy machine
they tell what the daemon would do with a core to itself (and what it takes from a guest's
single vCPU when it serves the root file system).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from seedboot.agent import procfs
from seedboot.agent.mount_options import MountOptions
from seedboot.tools import keys, publish
from seedboot.tools.latency_proxy import LatencyProxy
from tests.helpers import Nginx

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "bench" / "blockdev"
NAME = "bench"
CHUNK = 1 << 20


def run(*cmd: str | Path, check: bool = True) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {r.stderr.strip()}")
    return r.stdout


def build(size_mb: int) -> tuple[Path, Path, Path]:
    """(image, mirror, pubkey), cached under build/bench/blockdev."""
    w = BUILD / f"{size_mb}M"
    image, mirror, pub = w / "image.ext4", w / "mirror", w / "key.pub"
    if (w / "done").exists():
        return image, mirror, pub
    shutil.rmtree(w, ignore_errors=True)
    src = w / "src"
    src.mkdir(parents=True)
    want = size_mb << 20
    files = [
        p for d in ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib") for p in sorted(Path(d).rglob("*"))
    ]
    with open(src / "big.bin", "wb") as out:
        while out.tell() < want:
            for p in files:
                if out.tell() >= want:
                    break
                if p.is_file() and not p.is_symlink():
                    with suppress(OSError):
                        out.write(p.read_bytes()[: want - out.tell()])
    print(f"building {image} ({size_mb} MiB file)...", file=sys.stderr)
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(image), f"{size_mb + size_mb // 8 + 32}M"],
        check=True,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    (src / "big.bin").unlink()
    keys.write_keypair(w / "key", force=True)
    publish.publish(image, mirror, NAME, keys.load_secret_key(w / "key.key"), level=3)
    (w / "done").touch()
    return image, mirror, pub


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_seq(path: Path) -> float:
    """MB/s reading the whole file."""
    drop_caches()
    n = 0
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, CHUNK):
            n += len(chunk)
    finally:
        os.close(fd)
    return n / (time.monotonic() - t0) / 1e6


def random_latency(path: Path, count: int = 300) -> tuple[float, float]:
    """Median and 95th percentile (ms) of 4 KiB reads at random offsets, page cache dropped."""
    drop_caches()
    size = path.stat().st_size
    rng = random.Random(7)
    times = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(count):
            off = rng.randrange(0, size // 4096) * 4096
            t0 = time.perf_counter()
            os.pread(fd, 4096, off)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95)]


def parallel_reads(disk: Path, pid: int, readers: int = 4, count: int = 2000) -> tuple[float, float]:
    """MB/s and the daemon's CPU µs per read for ``readers`` threads reading 64 KiB at random
    offsets of the first 4 MiB of ``disk`` with O_DIRECT: each read is a FUSE request for
    blocks the daemon holds in memory, several queued at once (as a booting system's parallel
    start-up sends them), so this is the cost of serving a request itself."""
    size = min(disk.stat().st_size, 4 << 20) // 65536

    def reader(k: int) -> None:
        rng = random.Random(k)
        buf = mmap.mmap(-1, 65536)
        fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
        try:
            for _ in range(count):
                os.preadv(fd, [buf], rng.randrange(size) * 65536)
        finally:
            os.close(fd)
            buf.close()

    c0, t0 = cpu_seconds(pid), time.monotonic()
    threads = [threading.Thread(target=reader, args=(k,)) for k in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took, n = time.monotonic() - t0, readers * count
    return n * 65536 / took / 1e6, (cpu_seconds(pid) - c0) / n * 1e6


@contextmanager
def ext4_on(image: Path, where: Path, direct_io: bool = True) -> Iterator[Path]:
    with ExitStack() as stack:
        dio = "on" if direct_io else "off"
        dev = run("losetup", "-r", f"--direct-io={dio}", "-f", "--show", image).strip()
        stack.callback(run, "losetup", "-d", dev, check=False)
        where.mkdir(parents=True, exist_ok=True)
        run("mount", "-o", "ro", dev, where)
        stack.callback(run, "umount", where, check=False)
        yield where


@contextmanager
def seedboot_mount(mirror_url: str | None, cache: Path, pub: Path, mp: Path, *extra: str) -> Iterator[int]:
    mp.mkdir(parents=True, exist_ok=True)
    args = ["mount", "--name", NAME, "--pubkey", str(pub), "--cache", str(cache), *extra]
    if mirror_url:
        args += ["--mirror", mirror_url]
    else:
        args.append("--offline")
    r = subprocess.run(
        [sys.executable, "-m", "seedboot.tools.cli", *args, str(mp)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        raise RuntimeError(f"mount failed: {r.stderr}")
    pid = int(json.loads((mp / "status.json").read_bytes())["pid"])
    try:
        yield pid
    finally:
        u = subprocess.run(
            [sys.executable, "-m", "seedboot.tools.cli", "umount", str(mp)], capture_output=True, text=True
        )
        if u.returncode != 0:
            run("umount", "-l", mp, check=False)


def cpu_seconds(pid: int) -> float:
    return procfs.cpu_seconds(f"/proc/{pid}/stat")


def peak_rss(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    val = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in status if ln.startswith(("VmRSS", "VmHWM"))}
    return val["VmRSS"], val["VmHWM"]


def wait_prefetch(mp: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if json.loads((mp / "status.json").read_bytes())["prefetch"]["complete"]:
            return
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--conns", type=int, default=MountOptions.conns, help="the daemon's default unless given")
    ap.add_argument("--runs", type=int, default=3, help="repeat each case; figures are median [min-max]")
    ap.add_argument("--rtts", default="0,100", help="cold cases at these RTTs (ms)")
    ap.add_argument("--prefetch", default="off,all", help="cold cases with these --prefetch modes")
    ap.add_argument(
        "--loop-direct-io",
        choices=("on", "off"),
        default="on",
        help="loop device over disk.img with or without direct I/O (the baseline always uses it)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices, FUSE, drop_caches)", file=sys.stderr)
        return 2
    image, mirror, pub = build(args.size_mb)
    speed: dict[str, list[float]] = {}  # MB/s of each run
    cpu: dict[str, list[float]] = {}  # the daemon's CPU seconds for the read: less load-dependent
    rss: dict[str, list[tuple[int, int]]] = {}
    lat: dict[str, list[tuple[float, float]]] = {}
    par: list[tuple[float, float]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-blockdev-"))
    nginx = Nginx(root=mirror, workdir=tmp / "nginx").start()
    host, port = nginx.url.removeprefix("http://").split(":")
    conns = ["--conns", str(args.conns)]
    dio = args.loop_direct_io == "on"

    def note(name: str, value: float, cpu_s: float | None = None, pid: int | None = None) -> None:
        speed.setdefault(name, []).append(value)
        if cpu_s is not None:
            cpu.setdefault(name, []).append(cpu_s)
        if pid is not None:
            rss.setdefault(name, []).append(peak_rss(pid))
        print(f"  {name:28s} {value:8.1f} MB/s", file=sys.stderr, flush=True)

    try:
        for _ in range(args.runs):
            with ext4_on(image, tmp / "direct") as fs:
                note("direct loop", read_seq(fs / "big.bin"))
                lat.setdefault("direct loop", []).append(random_latency(fs / "big.bin"))
            for rtt in [int(x) / 1000 for x in args.rtts.split(",")]:
                for prefetch in args.prefetch.split(","):
                    name = f"cold {rtt * 1000:.0f} ms, prefetch {prefetch}"
                    cache = tmp / "cache"
                    shutil.rmtree(cache, ignore_errors=True)
                    with (
                        LatencyProxy(upstream=(host, int(port)), rtt=rtt) as proxy,
                        seedboot_mount(
                            proxy.url, cache, pub, tmp / "mnt", "--prefetch", prefetch, *conns
                        ) as pid,
                        ext4_on(tmp / "mnt" / "disk.img", tmp / "fs", dio) as fs,
                    ):
                        c0 = cpu_seconds(pid)
                        mbs = read_seq(fs / "big.bin")
                        c1 = cpu_seconds(pid)
                        if prefetch == "all":
                            wait_prefetch(tmp / "mnt")
                        note(name, mbs, c1 - c0, pid)
            # the last cold run left the whole image in the cache
            name = "warm (cache, offline)"
            with (
                seedboot_mount(None, tmp / "cache", pub, tmp / "mnt", "--prefetch", "off") as pid,
                ext4_on(tmp / "mnt" / "disk.img", tmp / "fs", dio) as fs,
            ):
                c0 = cpu_seconds(pid)
                mbs = read_seq(fs / "big.bin")
                note(name, mbs, cpu_seconds(pid) - c0)
                lat.setdefault(name, []).append(random_latency(fs / "big.bin"))
                par.append(parallel_reads(tmp / "mnt" / "disk.img", pid))
                rss.setdefault(name, []).append(peak_rss(pid))
    finally:
        nginx.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, speed, cpu, rss, lat, par)
    return 0


def spread(values: list[float], fmt: str = "6.1f") -> str:
    """Median [min-max]: the machine is shared, one figure alone says little."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:{fmt}}"
    return f"{med:{fmt}} [{min(values):{fmt.lstrip('0123456789')}}-{max(values):{fmt.lstrip('0123456789')}}]"


def report(
    args: argparse.Namespace,
    speed: dict[str, list[float]],
    cpu: dict[str, list[float]],
    rss: dict[str, list[tuple[int, int]]],
    lat: dict[str, list[tuple[float, float]]],
    par: list[tuple[float, float]],
) -> None:
    gb = args.size_mb * 1.048576 / 1000
    print(
        f"\nsequential read of a {args.size_mb} MiB file in ext4 (page cache dropped), --conns {args.conns},"
        f" loop over disk.img with direct I/O {args.loop_direct_io}; {args.runs} run(s): median [min-max]"
    )
    direct = statistics.median(speed["direct loop"])
    for name, v in speed.items():
        scaled = [c / gb for c in cpu.get(name, [])]
        per_gb = f"   daemon CPU {spread(scaled, '5.2f')} s/GB" if scaled else ""
        print(f"  {name:28s} {spread(v)} MB/s  {statistics.median(v) / direct:5.2f}x direct{per_gb}")
    print("ratios (of medians; of the best runs)")
    best = {k: max(v) for k, v in speed.items()}
    med = {k: statistics.median(v) for k, v in speed.items()}
    warm = "warm (cache, offline)"
    print(
        f"  warm / direct                         {med[warm] / med['direct loop']:5.2f}; "
        f"{best[warm] / best['direct loop']:5.2f}  (target >= 0.7)"
    )
    for pf in args.prefetch.split(","):
        slow, fast = f"cold 100 ms, prefetch {pf}", f"cold 0 ms, prefetch {pf}"
        if slow in med and fast in med:
            print(
                f"  cold 100 ms / cold 0 ms, prefetch {pf:3s} {med[slow] / med[fast]:5.2f}; "
                f"{best[slow] / best[fast]:5.2f}  (target >= 0.5)"
            )
    print("random 4 KiB reads (page cache dropped): median / p95, ms")
    for name, runs in lat.items():
        print(f"  {name:28s} {spread([m for m, _ in runs], '6.2f')} / {spread([p for _, p in runs], '6.2f')}")
    if par:
        print("warm disk.img, 4 readers of 64 KiB at random in its first 4 MiB (in the daemon's memory)")
        print(
            f"  {'warm (cache, offline)':28s} {spread([m for m, _ in par])} MB/s, "
            f"daemon CPU {spread([u for _, u in par], '5.1f')} µs per read"
        )
    print("daemon memory: resident at the end / peak, MB")
    for name, mem in rss.items():
        cur = [c / 1e6 for c, _ in mem]
        peak = [p / 1e6 for _, p in mem]
        print(f"  {name:28s} {spread(cur)} / {spread(peak)}")


if __name__ == "__main__":
    sys.exit(main())
