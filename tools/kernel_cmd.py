"""``seedboot kernel fetch --out DIR``: Debian's kernel with its modules, ready for mkinitramfs."""

from __future__ import annotations

import argparse
from pathlib import Path

from seedboot.tools import kernel


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("kernel", help="get a kernel for the seed disk")
    ksub = p.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)
    f = ksub.add_parser("fetch", help=f"download {kernel.META_PACKAGE} with apt-get, extract it, run depmod")
    f.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="kernel directory (reused if complete)"
    )
    f.add_argument("--force", action="store_true", help="fetch again even if DIR is complete")
    f.set_defaults(func=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    print(f"fetching {kernel.META_PACKAGE} into {args.out} ...", flush=True)
    k = kernel.fetch(args.out, force=args.force)
    n = sum(1 for _ in k.modules.rglob("*.ko*"))
    size = k.vmlinuz.stat().st_size
    print(f"kernel {k.version}: {k.vmlinuz} ({size / 1e6:.1f} MB), {n} modules in {k.modules}")
    return 0
