"""``seedboot verify --mirror DIR_OR_URL --name NAME --pubkey PREFIX.pub``: check a version end to end."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seedboot.agent import release
from seedboot.tools import verify
from seedboot.tools.progress import progress_callback


def add_mirror_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mirror", required=True, metavar="DIR_OR_URL", help="mirror directory or http(s) URL")
    p.add_argument("--name", required=True, help="image name")
    p.add_argument(
        "--pubkey",
        required=True,
        action="append",
        type=Path,
        metavar="PREFIX.pub",
        help="trusted public key (repeatable)",
    )
    p.add_argument("--version", type=int, help="version to check (default: the latest)")
    p.add_argument("--conns", type=int, default=16, help="HTTP transfers in flight (default %(default)s)")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="check a published version: signature, expiry, index and every block",
        description="Exit status 1 and one line per problem if anything is wrong.",
    )
    add_mirror_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    keys = release.load_keys(args.pubkey)
    with progress_callback(f"verify {args.name}") as progress:
        rep = verify.verify_release(args.mirror, args.name, keys, args.version, args.conns, progress)
    meta = rep.release.meta
    for line in rep.problems:
        print(f"seedboot verify: {line}", file=sys.stderr)
    if rep.problems:
        print(
            f"{meta.name} version {meta.version}: {len(rep.problems)} problem(s); {rep.checked} blocks good",
            file=sys.stderr,
        )
        return 1
    print(
        f"{meta.name} version {meta.version} OK: signed by {rep.key_id}, expires {meta.expires_str()}, "
        f"{rep.checked} distinct blocks ({rep.stored_bytes / 1e6:.1f} MB) verified, "
        f"{meta.image_size / 1e6:.1f} MB image"
    )
    return 0
