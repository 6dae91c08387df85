"""The publisher's view of a local mirror tree: images, versions and the blocks they reference.

Read without a public key: this is the publisher's own tree (``seedboot verify`` is what
checks signatures). Shared by ``seedboot info`` and ``seedboot gc``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from seedboot.agent import index, layout, metadata, signature
from seedboot.agent.errors import FormatError, SeedError
from seedboot.tools.publish import existing_versions, read_latest


@dataclass
class Version:
    name: str
    version: int
    meta: metadata.Metadata | None
    index: index.Index | None
    key_id: str | None
    problem: str | None = None

    def digests(self) -> set[bytes]:
        if self.index is None:
            return set()
        return {d for d, n in zip(self.index.digests, self.index.lengths, strict=True) if n}


@dataclass
class Image:
    name: str
    latest: int | None
    versions: list[Version] = field(default_factory=list)


def check_mirror(mirror: Path) -> Path:
    if not mirror.is_dir():
        raise SeedError(f"mirror directory {mirror} does not exist", "check --mirror")
    return mirror


def image_names(mirror: Path) -> list[str]:
    return sorted(p.parent.name for p in check_mirror(mirror).glob("*/meta") if p.is_dir())


def load_version(mirror: Path, name: str, version: int) -> Version:
    v = Version(name, version, None, None, None)
    mpath = mirror / layout.meta_path(name, version)
    try:
        v.meta = metadata.parse(mpath.read_bytes(), what=str(mpath))
        sig = signature.parse_signature((mirror / layout.sig_path(name, version)).read_text())
        v.key_id = signature.key_id_str(sig.key_id)
        v.index = index.decode((mirror / layout.index_path(name, v.meta.index)).read_bytes())
    except OSError as e:
        v.problem = f"{e.filename}: {e.strerror}"
    except (FormatError, UnicodeDecodeError) as e:
        v.problem = str(e)
    return v


def load_image(mirror: Path, name: str) -> Image:
    layout.check_name(name)
    versions = existing_versions(check_mirror(mirror), name)
    if not versions:
        known = ", ".join(image_names(mirror)) or "none"
        raise SeedError(f"image {name!r} is not in mirror {mirror}", f"images there: {known}")
    img = Image(name, read_latest(mirror, name))
    img.versions = [load_version(mirror, name, v) for v in versions]
    return img


def block_sizes(mirror: Path) -> dict[str, int]:
    """Every stored block (by hex digest) and its size on disk."""
    out: dict[str, int] = {}
    for p in (mirror / "blocks").glob("*/*"):
        if not p.name.startswith("."):
            out[p.name] = p.stat().st_size
    return out
