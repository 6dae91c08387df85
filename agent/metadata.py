"""The signed statement of one image version: what the signature actually vouches for."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from seedboot.agent import signature
from seedboot.agent.errors import FormatError, MetadataExpired
from seedboot.agent.layout import check_digest, check_name

META_FORMAT = 1
VERITY_BLOCK = 4096
# dm-verity's data block size is the root device's logical block size, so it must not exceed
# the file system's block size (mke2fs gives small file systems 1 KiB blocks).
VERITY_DATA_BLOCKS = (512, 1024, 2048, 4096)


@dataclass
class Verity:
    """A dm-verity hash tree of the image (``NAME/verity/<tree>``, no superblock): the kernel
    checks every read of the root device against ``root_hash`` (see tools/verity.py)."""

    root_hash: str
    salt: str  # hex
    tree: str  # SHA-256 of the hash tree file
    tree_size: int
    data_blocks: int  # of data_block_size; the last one zero-padded if the image is not aligned
    data_size: int  # the image size the tree was computed over (before padding)
    hash: str = "sha256"
    data_block_size: int = VERITY_BLOCK
    hash_block_size: int = VERITY_BLOCK
    hash_type: int = 1
    # The tree compressed (zstd) at ``NAME/verity/<tree>.zst``: its byte count, 0 if none was
    # published. A tree is mostly the same hash over and over (a file system image is mostly
    # zeros): 8.5 MB for a 1 GiB image, 1.8 MB compressed, fetched while the machine boots.
    tree_zst_size: int = 0
    # SHA-256 of that ``.zst`` ("" in metadata from before the field): the agent checks the
    # 1.8 MB it fetched instead of hashing the 8.5 MB tree it decompresses to (~0.1 s of the
    # first boot's CPU under emulation). Signed bytes decompress to one tree only, and the
    # publisher checks that it is the one ``tree`` names (``seedboot verify`` does again).
    tree_zst: str = ""


def _parse_verity(v: Any, what: str) -> Verity:
    if not isinstance(v, dict):
        raise FormatError(f"{what}: field 'verity' must be an object")
    out = Verity(
        root_hash=check_digest(json_field(v, "root_hash", str, what)),
        salt=json_field(v, "salt", str, what),
        tree=check_digest(json_field(v, "tree", str, what)),
        tree_size=json_field(v, "tree_size", int, what),
        data_blocks=json_field(v, "data_blocks", int, what),
        data_size=json_field(v, "data_size", int, what),
        hash=json_field(v, "hash", str, what),
        data_block_size=json_field(v, "data_block_size", int, what),
        hash_block_size=json_field(v, "hash_block_size", int, what),
        hash_type=json_field(v, "hash_type", int, what),
        tree_zst_size=json_field(v, "tree_zst_size", int, what) if "tree_zst_size" in v else 0,
        tree_zst=check_digest(json_field(v, "tree_zst", str, what)) if "tree_zst" in v else "",
    )
    ok = (
        out.hash == "sha256"
        and out.hash_type == 1
        and out.data_block_size in VERITY_DATA_BLOCKS
        and out.hash_block_size == VERITY_BLOCK
        and len(out.salt) <= 512
        and all(c in "0123456789abcdef" for c in out.salt)
        and len(out.salt) % 2 == 0
        and out.tree_size > 0
        and out.tree_zst_size >= 0
        and (out.tree_zst_size > 0 or not out.tree_zst)
        and out.data_blocks == -(-out.data_size // out.data_block_size)
    )
    if not ok:
        raise FormatError(f"{what}: unsupported or inconsistent dm-verity parameters", "update seedboot")
    return out


@dataclass
class Metadata:
    name: str
    version: int
    created: int
    expires: int
    index: str
    index_size: int
    image_size: int
    block_size: int
    profile: str | None = None
    mirrors: list[str] = field(default_factory=list)
    format: int = META_FORMAT
    verity: Verity | None = None

    def to_json(self) -> bytes:
        d = asdict(self)
        if self.verity is None:
            del d["verity"]  # metadata without verity stays byte-identical to before the field
        else:
            # likewise a tree published without its .zst, or before its digest was signed
            if not self.verity.tree_zst_size:
                del d["verity"]["tree_zst_size"]
            if not self.verity.tree_zst:
                del d["verity"]["tree_zst"]
        return (json.dumps(d, sort_keys=True, indent=1) + "\n").encode()

    def expires_str(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires))


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """DATA as a JSON object, or a FormatError naming WHAT (the metadata, a keys statement)."""
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{what}: not JSON: {e}") from e
    if not isinstance(d, dict):
        raise FormatError(f"{what}: not a JSON object")
    return d


def json_field(d: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """D[KEY] if it is a KIND (a bool is not an int), or a FormatError naming the field."""
    v = d.get(key)
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise FormatError(f"{what}: field {key!r} missing or not {kind.__name__}")
    return v


def parse(data: bytes, what: str = "metadata") -> Metadata:
    d = json_object(data, what)
    fmt = json_field(d, "format", int, what)
    if fmt != META_FORMAT:
        raise FormatError(f"{what}: metadata format {fmt} not supported", "update seedboot")
    profile = d.get("profile")
    if profile is not None:
        check_digest(profile)
    mirrors = d.get("mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise FormatError(f"{what}: field 'mirrors' must be a list of URLs")
    meta = Metadata(
        name=check_name(json_field(d, "name", str, what)),
        version=json_field(d, "version", int, what),
        created=json_field(d, "created", int, what),
        expires=json_field(d, "expires", int, what),
        index=check_digest(json_field(d, "index", str, what)),
        index_size=json_field(d, "index_size", int, what),
        image_size=json_field(d, "image_size", int, what),
        block_size=json_field(d, "block_size", int, what),
        profile=profile,
        mirrors=list(mirrors),
        format=fmt,
        verity=None if d.get("verity") is None else _parse_verity(d["verity"], what),
    )
    if meta.verity is not None and meta.verity.data_size != meta.image_size:
        raise FormatError(f"{what}: the dm-verity tree covers {meta.verity.data_size} bytes, not the image")
    return meta


def verify(
    data: bytes,
    sig_text: str,
    keys: list[signature.PublicKey],
    name: str,
    version: int | None = None,
    what: str = "metadata",
) -> Metadata:
    """Verify the signature first, then parse; the content must be for the image asked for."""
    signature.verify(data, sig_text, keys, what)
    meta = parse(data, what)
    if meta.name != name:
        raise FormatError(f"{what} is for image {meta.name!r}, not {name!r}", "the mirror tree is mixed up")
    if version is not None and meta.version != version:
        raise FormatError(f"{what} says version {meta.version}, expected {version}")
    return meta


def check_expiry(meta: Metadata, now: float | None = None, tolerance: int = 0) -> None:
    now = time.time() if now is None else now
    if now > meta.expires + tolerance:
        raise MetadataExpired(
            f"metadata of {meta.name} version {meta.version} expired on {meta.expires_str()}",
            "the publisher must re-sign it (seedboot publish), or check this machine's clock",
        )
