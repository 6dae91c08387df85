"""``seedboot demo``: build, publish, serve, boot a seed disk in QEMU, reboot it offline, summarize."""

from __future__ import annotations

import argparse
from pathlib import Path

from seedboot.tools import demo


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole story on this machine: publish a demo root, boot it from a seed disk, then offline",
        description="Fetch a kernel, build and publish a demo root, serve it on loopback, build seed disks, "
        "boot one in QEMU (software emulation is fine) with the network, then again without, and "
        "print what each stage took and what was fetched. Run through scripts/demo on a fresh machine.",
    )
    p.add_argument(
        "--work", type=Path, default=Path("build/demo"), help="work directory (default build/demo)"
    )
    p.add_argument("--fresh", action="store_true", help="start from an empty work directory")
    p.add_argument(
        "--data-mb", type=int, default=32, help="size of the demo root's checked file (default 32)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return demo.run(args.work, fresh=args.fresh, data_mb=args.data_mb)
