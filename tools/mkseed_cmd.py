"""``seedboot mkseed``: seed disks (vmdk, vdi, vhd, hdd, qcow2, raw, ova) that boot from mirrors."""

from __future__ import annotations

import argparse
from pathlib import Path

from seedboot.tools import diskformats, mkseed


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mkseed",
        help="build seed disks: GRUB (BIOS+UEFI), kernel, miniroot, empty KNXBLOCK cache",
        description="Build a seed disk in each hypervisor format. Each file stays under 24 MB; the "
        "KNXBLOCK cache partition fills the rest of the virtual size and grows with use.",
    )
    p.add_argument(
        "--mirror",
        action="append",
        required=True,
        metavar="URL",
        help="mirror URL as the booting machine reaches it (repeat for more)",
    )
    p.add_argument(
        "--name",
        action="append",
        required=True,
        metavar="NAME",
        help="image name; one menu entry each, the first is the default (repeat for more)",
    )
    p.add_argument(
        "--pubkey",
        action="append",
        required=True,
        type=Path,
        metavar="KEY.pub",
        help="trusted publisher key (built into the miniroot; used to verify versions now)",
    )
    p.add_argument("--kernel", required=True, type=Path, metavar="DIR", help="from seedboot kernel fetch")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the disks are written")
    p.add_argument("--size", default="16G", help="virtual disk size (default 16G)")
    p.add_argument(
        "--formats",
        default=",".join(diskformats.ALL_FORMATS),
        help="comma list of vmdk,vdi,vhd,hdd,qcow2,raw,ova or 'all' (default: all)",
    )
    p.add_argument(
        "--initrd",
        type=Path,
        metavar="FILE",
        help="a prebuilt miniroot (default: build one with seedboot mkinitramfs)",
    )
    p.add_argument("--timeout", type=int, default=3, help="GRUB menu timeout in seconds (default 3)")
    p.add_argument(
        "--versions",
        type=int,
        default=3,
        help="older signed versions to offer for rollback (default 3; -1: do not look up)",
    )
    p.add_argument(
        "--list-from",
        action="append",
        default=[],
        metavar="DIR|URL",
        help="where this machine reads the mirror to list versions (default: the --mirror URLs)",
    )
    p.add_argument(
        "--append",
        action="append",
        default=[],
        metavar="ARGS",
        help="extra kernel arguments for every entry (e.g. 'seed.prefetch=all')",
    )
    p.add_argument(
        "--default",
        default="",
        metavar="ENTRY",
        help="default menu entry id: NAME, NAME-offline, NAME-record, NAME-vN, rescue",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = mkseed.SeedSpec(
        mirrors=args.mirror,
        names=args.name,
        pubkeys=args.pubkey,
        kernel=args.kernel,
        out=args.out,
        size=mkseed.parse_size(args.size),
        formats=diskformats.parse_formats(args.formats),
        initrd=args.initrd,
        timeout=args.timeout,
        versions=args.versions,
        list_from=args.list_from,
        append=[w for a in args.append for w in a.split()],
        default=args.default,
    )
    res = mkseed.build(spec)
    print(mkseed.summary(res))
    return 0
