"""``seedboot info --mirror DIR [--name NAME]``: versions, sizes, compression, dedup, sharing."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from seedboot.tools import mirrortree


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "info",
        help="list the images and versions of a local mirror, with sizes and dedup ratios",
        description="Reads the publisher's own tree without checking signatures (seedboot verify does).",
    )
    p.add_argument("--mirror", required=True, type=Path, metavar="DIR", help="mirror directory")
    p.add_argument("--name", help="one image (default: every image in the mirror)")
    p.set_defaults(func=run)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _when(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def describe(mirror: Path, name: str) -> list[str]:
    img = mirrortree.load_image(mirror, name)
    lines = [f"{name}: {len(img.versions)} version(s), latest {img.latest}"]
    prev: set[bytes] | None = None
    union: dict[bytes, int] = {}
    per_version_stored = 0
    now = time.time()
    for v in img.versions:
        mark = "*" if v.version == img.latest else " "
        if v.meta is None or v.index is None:
            lines.append(f" {mark} v{v.version}: unreadable: {v.problem}")
            continue
        m, idx = v.meta, v.index
        holes = sum(1 for n in idx.lengths if n == 0)
        distinct = {d: n for d, n in zip(idx.digests, idx.lengths, strict=True) if n}
        stored = sum(distinct.values())
        referenced = sum(idx.lengths)
        plain = sum(idx.plain_len(i) for i in range(idx.nblocks) if idx.lengths[i])
        union.update(distinct)
        per_version_stored += stored
        expiry = "EXPIRED" if m.expires < now else "expires"
        lines.append(
            f" {mark} v{v.version}: created {_when(m.created)}, {expiry} {_when(m.expires)}, key {v.key_id}; "
            f"image {_mb(m.image_size)}, {idx.nblocks} blocks of {idx.block_size // 1024}K "
            f"({len(distinct)} distinct, {holes} holes), stored {_mb(stored)}; "
            f"compression {plain / referenced if referenced else 1:.2f}x, "
            f"dedup {referenced / stored if stored else 1:.2f}x"
            + (f", profile {m.profile[:12]}" if m.profile else "")
            + (f", dm-verity root {m.verity.root_hash[:12]}" if m.verity else "")
        )
        if prev is not None:
            shared = len(prev & distinct.keys())
            new = sum(n for d, n in distinct.items() if d not in prev)
            lines.append(
                f"      shares {shared} of its {len(distinct)} blocks with the version before; {_mb(new)} new"
            )
        prev = set(distinct)
    total = sum(union.values())
    if len(img.versions) > 1 and total:
        lines.append(
            f"  all versions: {_mb(total)} stored for {_mb(per_version_stored)} of versions "
            f"(dedup across versions {per_version_stored / total:.2f}x)"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    mirror = mirrortree.check_mirror(args.mirror)
    names = [args.name] if args.name else mirrortree.image_names(mirror)
    for name in names:
        print("\n".join(describe(mirror, name)))
    on_disk = mirrortree.block_sizes(mirror)
    print(
        f"mirror {mirror}: {len(mirrortree.image_names(mirror))} image(s), "
        f"{len(on_disk)} blocks, {_mb(sum(on_disk.values()))} in blocks/"
    )
    return 0
