"""Publish throughput against ``zstd -T0`` compressing the same image at the same level.

    .venv/bin/python -m benchmarks.publish [--source DIR] [--levels 3,6,9] [--runs 3]

The image is a real ext4 filesystem (``mke2fs -d``) of a real tree (default ``/usr/bin``:
binaries, scripts, duplicates, and free space as holes), cached under ``build/bench/``.
Each run times, back to back on the same warm image, (a) the stock ``zstd -T0 -LEVEL``
CLI compressing it to a file next to the mirror and (b) ``publish()`` into a fresh mirror
(cut, hole check, compress, hash, write, syncfs, sign). The ratio publish/zstd (wall time)
is what counts: the machine is shared, so absolute MB/s vary run to run, and the two are
measured under the same load. The CPU-time ratio (zstd's CPU seconds / publish's) is the
load-independent view of the same: above 1, publish spends less CPU than zstd does.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seedboot.tools import keys, publish

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "bench"


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def build_image(source: Path) -> Path:
    image = BUILD / f"publish-{source.name or 'root'}.ext4"
    if image.exists():
        return image
    BUILD.mkdir(parents=True, exist_ok=True)
    size_mb = du_bytes(source) * 13 // 10 // (1 << 20) + 64
    print(f"building {image} from {source} ({size_mb} MB)...", file=sys.stderr)
    tmp = image.with_suffix(".tmp")
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(source), str(tmp), f"{size_mb}M"],
        check=True,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    tmp.rename(image)
    return image


def cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def time_zstd(image: Path, level: int, workdir: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and output size of ``zstd -T0 -LEVEL IMAGE -o OUT``."""
    out = workdir / "image.zst"
    c0, t0 = cpu(resource.RUSAGE_CHILDREN), time.monotonic()
    subprocess.run(["zstd", "-T0", f"-{level}", "-q", "-f", str(image), "-o", str(out)], check=True)
    wall, cpus = time.monotonic() - t0, cpu(resource.RUSAGE_CHILDREN) - c0
    size = out.stat().st_size
    out.unlink()
    return wall, cpus, size


def time_publish(
    image: Path, level: int, key: keys.SecretKey, workdir: Path
) -> tuple[float, float, publish.PublishStats]:
    mirror = Path(tempfile.mkdtemp(dir=workdir, prefix="mirror-"))
    try:
        c0, t0 = cpu(resource.RUSAGE_SELF), time.monotonic()
        res = publish.publish(image, mirror, "bench", key, level=level)
        return time.monotonic() - t0, cpu(resource.RUSAGE_SELF) - c0, res.stats
    finally:
        shutil.rmtree(mirror)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("/usr/bin"), help="tree to make the image from")
    ap.add_argument("--levels", default="3,6,9", help="zstd levels to compare (default %(default)s)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    image = build_image(args.source)
    size = image.stat().st_size
    image.read_bytes()  # warm the page cache for both contenders
    key = keys.generate()
    print(f"image {image}: {size / 1e6:.0f} MB, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("level  zstd-T0 MB/s  publish MB/s  ratio  cpu-ratio   zstd size  publish stored  (holes, dedup)")
    summary = []
    with tempfile.TemporaryDirectory(dir=BUILD) as work:
        for level in (int(x) for x in args.levels.split(",")):
            ratios, cpu_ratios = [], []
            for run in range(args.runs):
                # Alternate who goes first, so neither always meets the other's dirty pages.
                if run % 2:
                    pt, pc, st = time_publish(image, level, key, Path(work))
                    zt, zc, zsize = time_zstd(image, level, Path(work))
                else:
                    zt, zc, zsize = time_zstd(image, level, Path(work))
                    pt, pc, st = time_publish(image, level, key, Path(work))
                zmb, pmb = size / 1e6 / zt, size / 1e6 / pt
                ratios.append(pmb / zmb)
                cpu_ratios.append(zc / pc)
                print(
                    f"{level:5d}  {zmb:12.1f}  {pmb:12.1f}  {pmb / zmb:5.2f}  {zc / pc:9.2f}  "
                    f"{zsize / 1e6:8.1f} MB  {st.bytes_stored / 1e6:11.1f} MB  "
                    f"({st.holes} holes, dedup {st.dedup_ratio:.2f}x)"
                )
            summary.append(
                f"level {level}: median ratio {statistics.median(ratios):.2f} (best {max(ratios):.2f}), "
                f"CPU-time ratio {statistics.median(cpu_ratios):.2f}, over {args.runs} runs, "
                f"stored {st.bytes_stored / 1e6:.1f} MB ({st.bytes_plain / st.bytes_stored:.2f}x)"
            )
    print("\n".join(summary))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
