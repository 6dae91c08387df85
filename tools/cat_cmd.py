"""``seedboot cat --mirror DIR_OR_URL --name NAME --pubkey PREFIX.pub --out FILE``: rebuild an image."""

from __future__ import annotations

import argparse
from pathlib import Path

from seedboot.agent import release
from seedboot.tools import cat
from seedboot.tools.progress import progress_callback
from seedboot.tools.verify_cmd import add_mirror_args


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cat",
        help="rebuild a published image, byte-identical, verifying every block",
        description="Writes FILE.tmp, then renames it to FILE once every block verified.",
    )
    add_mirror_args(p)
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="where to write the image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    keys = release.load_keys(args.pubkey)
    with progress_callback(f"cat {args.name}") as progress:
        res = cat.cat_release(args.mirror, args.name, keys, args.out, args.version, args.conns, progress)
    mb = res.image_size / 1e6
    print(
        f"{res.name} version {res.version}: {mb:.1f} MB written to {args.out} "
        f"({res.blocks} blocks: {res.fetched} distinct fetched, {res.fetched_bytes / 1e6:.1f} MB, "
        f"{res.holes} holes) in {res.seconds:.2f}s, {mb / max(res.seconds, 1e-6):.1f} MB/s"
    )
    return 0
