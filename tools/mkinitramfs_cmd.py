"""``seedboot mkinitramfs``: the initramfs with the frozen agent, modules, keys and hooks."""

from __future__ import annotations

import argparse
from pathlib import Path

from seedboot.tools import mkinitramfs

TARGET_SIZE = 12 * 1000 * 1000


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mkinitramfs", help="build the seed disk's initramfs (zstd cpio with the frozen agent)"
    )
    p.add_argument("--kernel", required=True, type=Path, metavar="DIR", help="from: seedboot kernel fetch")
    p.add_argument(
        "--pubkey",
        required=True,
        type=Path,
        action="append",
        metavar="KEY.pub",
        help="trusted key (repeatable)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="initramfs image to write")
    p.add_argument(
        "--hooks", type=Path, default=mkinitramfs.HOOKS_SRC, metavar="DIR", help="hook tree (<point>.d/...)"
    )
    p.add_argument(
        "--extra-module",
        action="append",
        default=[],
        metavar="NAME",
        help="another kernel module (repeatable)",
    )
    p.add_argument("--level", type=int, default=19, help="zstd level (default 19)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    r = mkinitramfs.build(
        args.kernel,
        args.pubkey,
        args.out,
        hooks=args.hooks,
        extra_modules=args.extra_module,
        level=args.level,
    )
    note = "" if r.size <= TARGET_SIZE else f" (over the {TARGET_SIZE / 1e6:.0f} MB target)"
    print(
        f"{r.path}: {r.size / 1e6:.2f} MB{note}, {r.uncompressed / 1e6:.1f} MB unpacked "
        f"(agent runtime {r.runtime_size / 1e6:.1f} MB), kernel {r.kernel_version}, "
        f"{len(r.modules)} modules, {r.seconds:.0f}s"
    )
    return 0
