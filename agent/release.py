"""Open one signed version of an image: metadata verified, expiry checked, index verified.

Nothing of an image is trusted before ``open_release`` returns: the signature is checked
over the exact metadata bytes, then the index must hash to the digest the metadata names.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent import index as indexmod
from seedboot.agent import layout, metadata, signature
from seedboot.agent.atomic import write_atomic
from seedboot.agent.errors import FormatError, SeedError
from seedboot.agent.reader import NotFound, Reader

log = logging.getLogger(__name__)


@dataclass
class Release:
    meta: metadata.Metadata
    meta_bytes: bytes
    sig_text: str
    index: indexmod.Index
    index_bytes: bytes
    source: str

    @property
    def meta_digest(self) -> str:
        """SHA-256 of the signed metadata bytes: what identifies this release (e.g. for a TPM)."""
        return hashlib.sha256(self.meta_bytes).hexdigest()


def load_keys(paths: list[Path] | list[str]) -> list[signature.PublicKey]:
    if not paths:
        raise SeedError("no trusted public key given", "pass --pubkey KEY.pub")
    return [signature.load_public_key(p) for p in paths]


def latest_version(reader: Reader, name: str) -> int:
    layout.check_name(name)
    try:
        text = reader.get(layout.latest_path(name)).decode("ascii", "replace").strip()
    except NotFound as e:
        raise SeedError(
            f"image {name!r} is not on mirror {reader.location}", "check --name (seedboot info lists images)"
        ) from e
    if not text.isdigit():
        raise FormatError(
            f"{reader.location}: {layout.latest_path(name)} is not a version number: {text[:40]!r}"
        )
    return int(text)


def open_release(
    reader: Reader,
    name: str,
    keys: list[signature.PublicKey],
    version: int | None = None,
    now: float | None = None,
    tolerance: int = 0,
    check_expiry: bool = True,
) -> Release:
    layout.check_name(name)
    if version is None:
        version = latest_version(reader, name)
    what = f"{reader.location}/{layout.meta_path(name, version)}"
    try:
        meta_bytes = reader.get(layout.meta_path(name, version))
        sig_text = reader.get(layout.sig_path(name, version)).decode("utf-8", "replace")
    except NotFound as e:
        raise SeedError(
            f"version {version} of {name!r} is not on {reader.location}", "seedboot info lists versions"
        ) from e
    meta = metadata.verify(meta_bytes, sig_text, keys, name, version, what=what)
    if check_expiry:
        metadata.check_expiry(meta, now=now if now is not None else time.time(), tolerance=tolerance)
    index_bytes = reader.get(layout.index_path(name, meta.index))
    got = hashlib.sha256(index_bytes).hexdigest()
    if got != meta.index:
        raise FormatError(
            f"index of {name} v{version} on {reader.location} does not match its signed digest",
            "the mirror is corrupt or tampered with; try another mirror",
        )
    idx = indexmod.decode(index_bytes)
    if (idx.image_size, idx.block_size, len(index_bytes)) != (
        meta.image_size,
        meta.block_size,
        meta.index_size,
    ):
        raise FormatError(f"index of {name} v{version} disagrees with its metadata on sizes")
    log.info(
        "release %s v%d verified (index %s, %d blocks) from %s",
        name,
        version,
        meta.index[:12],
        idx.nblocks,
        reader.location,
    )
    return Release(meta, meta_bytes, sig_text, idx, index_bytes, reader.location)


def save_release(root: Path, rel: Release, set_latest: bool = True) -> None:
    """Keep a verified release in a directory laid out like a mirror (a cache can serve as one)."""
    name, version = rel.meta.name, rel.meta.version
    write_atomic(root / layout.index_path(name, rel.meta.index), rel.index_bytes)
    write_atomic(root / layout.sig_path(name, version), rel.sig_text.encode())
    write_atomic(root / layout.meta_path(name, version), rel.meta_bytes)
    if set_latest:
        write_atomic(root / layout.latest_path(name), f"{version}\n".encode())
