"""``seedboot publish IMAGE --mirror DIR --name NAME --key PREFIX.key``: one signed version."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

from seedboot.agent import blocks, index
from seedboot.agent.errors import SeedError
from seedboot.tools import keys, publish
from seedboot.tools.progress import Progress


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "publish",
        help="cut an image into zstd blocks, store the new ones in a mirror tree and sign a version",
        description="Publish IMAGE as a new signed version of NAME in the mirror directory DIR. "
        "Only blocks the mirror does not have yet are written; old versions stay (rollback).",
    )
    p.add_argument("image", type=Path, metavar="IMAGE", help="filesystem or disk image")
    p.add_argument(
        "--mirror", required=True, type=Path, metavar="DIR", help="mirror tree (created if missing)"
    )
    p.add_argument("--name", required=True, help="image name, e.g. debian12")
    p.add_argument(
        "--key", required=True, type=Path, metavar="PREFIX.key", help="secret key (seedboot keygen)"
    )
    p.add_argument("--version", type=int, help="version number (default: the newest + 1)")
    p.add_argument(
        "--block-size",
        type=str,
        default=f"{index.DEFAULT_BLOCK_SIZE // 1024}K",
        metavar="SIZE",
        help="power of two from 64K to 4M (default %(default)s)",
    )
    p.add_argument(
        "--expires",
        default=f"{publish.DEFAULT_EXPIRES // 86400}d",
        metavar="DURATION",
        help="metadata lifetime, e.g. 90d, 12h, 30m (default %(default)s)",
    )
    prof = p.add_mutually_exclusive_group()
    prof.add_argument(
        "--profile", type=Path, metavar="FILE", help="boot profile to publish with this version"
    )
    prof.add_argument(
        "--carry-profile",
        action="store_true",
        help="publish the newest version's boot profile remapped onto IMAGE through its files "
        "(ext2/3/4: the blocks an update's rewritten files moved to are prefetched, not their old "
        "places); that version's image is rebuilt from the mirror next to IMAGE meanwhile",
    )
    p.add_argument(
        "--previous-image",
        type=Path,
        metavar="FILE",
        help="with --carry-profile: the newest version's image, if you still have it, instead of "
        "rebuilding it from the mirror (only its size is checked: a wrong one makes a poor profile)",
    )
    p.add_argument(
        "--mirror-url",
        action="append",
        default=[],
        metavar="URL",
        help="a URL this mirror is served from, listed in the signed metadata (repeatable)",
    )
    p.add_argument(
        "--level", type=int, default=blocks.DEFAULT_LEVEL, help="zstd level 1-22 (default %(default)s)"
    )
    p.add_argument("--threads", type=int, default=0, help="compression threads (default: one per core)")
    p.add_argument(
        "--verity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also publish a dm-verity hash tree, its root hash signed, so the booting kernel "
        "checks every read (default: on; needs veritysetup from cryptsetup-bin)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    block_size = publish.parse_size(args.block_size)
    expires = publish.parse_duration(args.expires)
    key = keys.load_secret_key(args.key)
    profile = args.profile
    if args.previous_image is not None and not args.carry_profile:
        raise SeedError("--previous-image goes with --carry-profile", "add --carry-profile, or leave it out")
    with contextlib.ExitStack() as stack:
        if args.carry_profile:
            from seedboot.tools import profile_remap

            work = Path(
                stack.enter_context(tempfile.TemporaryDirectory(dir=args.image.parent, prefix=".seedboot-"))
            )
            carried = profile_remap.carry(
                args.mirror, args.name, key.public_key, args.image, block_size, work, args.previous_image
            )
            profile = carried.path
            r = carried.remap
            print(
                f"profile of version {carried.version} carried over: {len(r.blocks)} blocks, through "
                f"{r.files} files ({r.moved} moved, {r.gone} gone)"
            )
        return _publish(args, key, block_size, expires, profile)


def _publish(
    args: argparse.Namespace, key: keys.SecretKey, block_size: int, expires: int, profile: Path | None
) -> int:
    bar: Progress | None = None

    def progress(done: int, stats: publish.PublishStats) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(stats.image_size, f"publish {args.name}")
        bar.update(done, f"new {stats.new} reused {stats.reused} holes {stats.holes}")

    try:
        res = publish.publish(
            args.image,
            args.mirror,
            args.name,
            key,
            version=args.version,
            block_size=block_size,
            expires=expires,
            profile_file=profile,
            mirror_urls=args.mirror_url,
            level=args.level,
            threads=args.threads or None,
            progress=progress,
            verity=args.verity,
        )
    finally:
        if bar is not None:
            bar.close()
    verb = "re-signed" if res.resigned else "published"
    print(
        f"{verb} {res.name} version {res.version} (expires {res.meta.expires_str()}, "
        f"key {key.public_key.id_str}): {res.stats.summary()}"
    )
    return 0
