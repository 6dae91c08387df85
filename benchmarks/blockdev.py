"""The HTTP block device against a direct loop mount of the same image, in one run.

    .venv/bin/python -m benchmarks.blockdev [--size-mb 256] [--runs 1] [--conns 32]

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
shared: run it twice and look at the spread before believing a figure. The daemon's CPU
seconds per case (MB per CPU-second) do not depend on the load as much as MB/s do: on a
busy machine they tell what the daemon would do with a core to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

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
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


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
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--runs", type=int, default=1, help="repeat each case, report the best")
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
    results: dict[str, float] = {}
    rss: list[tuple[str, int, int]] = []
    lat: dict[str, tuple[float, float]] = {}
    cpu: dict[str, float] = {}  # the daemon's CPU seconds for the read: load-independent
    tmp = Path(tempfile.mkdtemp(prefix="bench-blockdev-"))
    nginx = Nginx(root=mirror, workdir=tmp / "nginx").start()
    host, port = nginx.url.removeprefix("http://").split(":")
    conns = ["--conns", str(args.conns)]
    dio = args.loop_direct_io == "on"

    def best(name: str, value: float, cpu_s: float | None = None) -> None:
        if value > results.get(name, 0.0):
            results[name] = value
            if cpu_s is not None:
                cpu[name] = cpu_s
        print(f"  {name:28s} {value:8.1f} MB/s", file=sys.stderr, flush=True)

    try:
        for _ in range(args.runs):
            with ext4_on(image, tmp / "direct") as fs:
                best("direct loop", read_seq(fs / "big.bin"))
                lat["direct loop"] = random_latency(fs / "big.bin")
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
                        best(name, mbs, cpu_seconds(pid) - c0)
                        if prefetch == "all":
                            wait_prefetch(tmp / "mnt")
                        rss.append((name, *peak_rss(pid)))
            # the last cold run left the whole image in the cache
            with (
                seedboot_mount(None, tmp / "cache", pub, tmp / "mnt", "--prefetch", "off") as pid,
                ext4_on(tmp / "mnt" / "disk.img", tmp / "fs", dio) as fs,
            ):
                c0 = cpu_seconds(pid)
                mbs = read_seq(fs / "big.bin")
                best("warm (cache, offline)", mbs, cpu_seconds(pid) - c0)
                lat["warm (cache, offline)"] = random_latency(fs / "big.bin")
                rss.append(("warm", *peak_rss(pid)))
    finally:
        nginx.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    direct = results["direct loop"]
    print(
        f"\nsequential read of a {args.size_mb} MiB file in ext4 (page cache dropped), --conns {args.conns},"
        f" loop over disk.img with direct I/O {args.loop_direct_io}"
    )
    size = args.size_mb * 1.048576
    for name, v in results.items():
        per_cpu = (
            f"   daemon CPU {cpu[name]:5.2f} s = {size / cpu[name]:5.0f} MB/CPU-s" if cpu.get(name) else ""
        )
        print(f"  {name:28s} {v:8.1f} MB/s   {v / direct:5.2f}x direct{per_cpu}")
    print("ratios")
    warm = results["warm (cache, offline)"] / direct
    print(f"  warm / direct                       {warm:5.2f}  (target >= 0.7)")
    for pf in args.prefetch.split(","):
        slow, fast = results.get(f"cold 100 ms, prefetch {pf}"), results.get(f"cold 0 ms, prefetch {pf}")
        if slow and fast:
            print(f"  cold 100 ms / cold 0 ms, prefetch {pf:3s} {slow / fast:5.2f}  (target >= 0.5)")
    print("random 4 KiB reads (page cache dropped): median / p95")
    for name, (med, p95) in lat.items():
        print(f"  {name:28s} {med:6.2f} / {p95:6.2f} ms")
    print("daemon memory: resident at the end / peak")
    for name, cur, peak in rss:
        print(f"  {name:28s} {cur / 1e6:6.1f} / {peak / 1e6:6.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
