"""Remove what no kept version of any image references.

Under the mirror lock (no publish runs meanwhile), in an order that keeps the mirror valid
if gc is killed: first the metadata of dropped versions (so they stop existing), one
``syncfs``, then their index and profile files and the unreferenced blocks. The version
``latest`` points to is always kept. A version gc cannot read stops gc before it deletes
anything: its blocks might be needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from seedboot.agent import layout
from seedboot.agent.errors import SeedError
from seedboot.agent.verity import packed_tree_path
from seedboot.tools import mirrortree
from seedboot.tools.publish import lock_mirror, syncfs

log = logging.getLogger(__name__)


@dataclass
class GcPlan:
    dropped_versions: list[tuple[str, int]] = field(default_factory=list)
    meta_files: list[Path] = field(default_factory=list)
    other_files: list[Path] = field(default_factory=list)  # index, profile, blocks, temp files
    scratch_dirs: list[Path] = field(default_factory=list)
    bytes_freed: int = 0
    blocks_kept: int = 0


def plan(mirror: Path, keep: int | None) -> GcPlan:
    if keep is not None and keep < 1:
        raise SeedError(f"invalid --keep {keep}", "keep at least the newest version (--keep 1)")
    p = GcPlan()
    referenced: set[str] = set()
    for name in mirrortree.image_names(mirror):
        img = mirrortree.load_image(mirror, name)
        ordered = sorted(img.versions, key=lambda v: v.version)
        kept = ordered if keep is None else ordered[-keep:]
        kept_nums = {v.version for v in kept} | ({img.latest} if img.latest is not None else set())
        kept_index: set[str] = set()
        kept_profiles: set[str] = set()
        kept_verity: set[str] = set()
        for v in ordered:
            if v.version not in kept_nums:
                p.dropped_versions.append((name, v.version))
                p.meta_files += [
                    mirror / layout.meta_path(name, v.version),
                    mirror / layout.sig_path(name, v.version),
                ]
                continue
            if v.meta is None or v.index is None:
                raise SeedError(
                    f"cannot read version {v.version} of {name}: {v.problem}",
                    "gc deletes nothing while a kept version is unreadable; fix or remove it first",
                )
            kept_index.add(v.meta.index)
            if v.meta.profile:
                kept_profiles.add(v.meta.profile)
            if v.meta.verity is not None:
                tree = v.meta.verity.tree
                kept_verity |= {tree, Path(packed_tree_path(name, tree)).name}
            referenced |= {d.hex() for d in v.digests()}
        # Index, profile and dm-verity files of dropped versions, and any a dead publish left.
        for sub, keepset in (("index", kept_index), ("profiles", kept_profiles), ("verity", kept_verity)):
            d = mirror / name / sub
            if d.is_dir():
                p.other_files += [f for f in sorted(d.iterdir()) if f.is_file() and f.name not in keepset]
    for f in sorted((mirror / "blocks").glob("*/*")):
        if f.name in referenced:
            p.blocks_kept += 1
        elif f.is_file():
            p.other_files.append(f)
    # Scratch directories of a dm-verity build that died with its publish.
    for d in sorted(mirror.glob(".verity-tmp-*")):
        p.other_files += sorted(f for f in d.rglob("*") if f.is_file())
        p.scratch_dirs.append(d)
    for f in [*p.meta_files, *p.other_files]:
        with contextlib.suppress(FileNotFoundError):
            p.bytes_freed += f.stat().st_size
    return p


def collect(mirror: Path, keep: int | None = None, dry_run: bool = False) -> GcPlan:
    mirror = mirrortree.check_mirror(mirror)
    with lock_mirror(mirror):
        p = plan(mirror, keep)
        if dry_run:
            return p
        for f in p.meta_files:
            f.unlink(missing_ok=True)
        if p.meta_files:
            syncfs(mirror)
        for f in p.other_files:
            f.unlink(missing_ok=True)
        for d in p.scratch_dirs:
            shutil.rmtree(d, ignore_errors=True)
        for d in (mirror / "blocks").glob("*"):
            if d.is_dir() and not any(d.iterdir()):
                os.rmdir(d)
        log.info(
            "gc %s: removed %d files, %d bytes", mirror, len(p.meta_files) + len(p.other_files), p.bytes_freed
        )
    return p
