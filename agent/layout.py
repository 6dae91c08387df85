"""Where things live in a mirror tree (and in a cache, which is laid out the same way).

    blocks/ab/abcdef...            one zstd block, named by the SHA-256 of its stored bytes
    NAME/index/<sha256>            the binary block table of one version
    NAME/profiles/<sha256>         a boot profile (block numbers in first-access order)
    NAME/meta/<version>.json       the signed statement of one version
    NAME/meta/<version>.json.minisig
    NAME/latest                    the newest version number (unsigned pointer)

All paths are relative, with forward slashes, so they serve as URL paths too.
"""

from __future__ import annotations

import re

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


def check_name(name: str) -> str:
    from seedboot.agent.errors import SeedError

    if not _NAME_RE.match(name) or name in ("blocks",):
        raise SeedError(
            f"invalid image name {name!r}",
            "use letters, digits, '.', '_' or '-' (at most 64), not 'blocks'",
        )
    return name


def check_digest(hexdigest: str) -> str:
    from seedboot.agent.errors import FormatError

    if not _HEX64_RE.match(hexdigest):
        raise FormatError(f"not a SHA-256 hex digest: {hexdigest!r}")
    return hexdigest


def block_path(hexdigest: str) -> str:
    return f"blocks/{hexdigest[:2]}/{hexdigest}"


def index_path(name: str, hexdigest: str) -> str:
    return f"{name}/index/{hexdigest}"


def profile_path(name: str, hexdigest: str) -> str:
    return f"{name}/profiles/{hexdigest}"


def meta_path(name: str, version: int) -> str:
    return f"{name}/meta/{version}.json"


def sig_path(name: str, version: int) -> str:
    return meta_path(name, version) + ".minisig"


def latest_path(name: str) -> str:
    return f"{name}/latest"


def keys_path() -> str:
    """The root-signed keys statement (see keys.py), shared by all images of a mirror."""
    return "keys.json"
