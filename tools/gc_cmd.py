"""``seedboot gc --mirror DIR [--keep N] [--dry-run]``: drop old versions and unreferenced blocks."""

from __future__ import annotations

import argparse
from pathlib import Path

from seedboot.tools import gc


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "gc",
        help="remove unreferenced blocks (and with --keep N, versions older than the newest N)",
        description="The latest version of each image is always kept. Files a killed publish left "
        "behind are removed too.",
    )
    p.add_argument("--mirror", required=True, type=Path, metavar="DIR", help="mirror directory")
    p.add_argument("--keep", type=int, help="keep the newest N versions of each image (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan = gc.collect(args.mirror, args.keep, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for name, version in plan.dropped_versions:
        print(f"{verb} {name} version {version}")
    for f in [*plan.meta_files, *plan.other_files]:
        print(f"{verb} {f}")
    n = len(plan.meta_files) + len(plan.other_files)
    print(
        f"gc {args.mirror}: {verb} {len(plan.dropped_versions)} version(s), {n} file(s), "
        f"{plan.bytes_freed / 1e6:.1f} MB; {plan.blocks_kept} blocks kept"
    )
    return 0
