"""``seedboot demo-root --out IMAGE``: a busybox ext4 root whose init proves it booted from the mirror."""

from __future__ import annotations

import argparse
from pathlib import Path

from seedboot.tools import demoroot


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo-root", help=f"build a demo root file system that prints {demoroot.MARKER_OK} when it boots"
    )
    p.add_argument("--out", required=True, type=Path, metavar="IMAGE", help="ext4 image to write")
    p.add_argument("--size", type=int, default=128, metavar="MB", help="image size (default 128)")
    p.add_argument(
        "--data", type=int, default=64, metavar="MB", help="incompressible data checked at boot (64)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    r = demoroot.build(args.out, size_mb=args.size, data_mb=args.data)
    print(f"{r.image}: {r.size_mb} MB ext4 (label {demoroot.LABEL}), {r.data_mb} MB data, sha256 {r.sha256}")
    return 0
