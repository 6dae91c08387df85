"""The publisher's side of keyring.py: write, rotate and revoke the root-signed keys statement.

The root key stays offline; these are the only operations that need it. Every change bumps
the statement's version (machines refuse older statements than they have seen) and re-signs
it with a fresh expiry. The signature is written before the statement, as publish does with
metadata, and both with atomic renames.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent import keyring, layout, signature
from seedboot.agent.atomic import write_atomic
from seedboot.agent.errors import SeedError, SignatureInvalid
from seedboot.agent.reader import NotFound, Reader
from seedboot.tools import keys as keysmod

log = logging.getLogger(__name__)

DEFAULT_EXPIRES = 365 * 86400
_DURATION_RE = re.compile(r"^(\d+)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """``365d``, ``12h``, ``2w`` or plain seconds."""
    m = _DURATION_RE.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise SeedError(f"invalid duration {text!r}", "use a positive number with s, m, h, d or w, e.g. 365d")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class Change:
    stmt: keyring.KeysStatement
    previous: int  # version before the change (0: there was none)
    path: Path


def read_statement(reader: Reader, roots: list[signature.PublicKey]) -> keyring.KeysStatement | None:
    try:
        data = reader.get(layout.keys_path())
        sig = reader.get(layout.keys_path() + ".minisig").decode("utf-8", "replace")
    except NotFound:
        return None
    return keyring.verify(data, sig, roots, f"keys statement {reader.location}/{layout.keys_path()}")


def _current(mirror: Path, root: keysmod.SecretKey) -> keyring.KeysStatement | None:
    from seedboot.agent.reader import DirReader

    if not mirror.is_dir():
        raise SeedError(f"mirror directory {mirror} does not exist", "check --mirror")
    try:
        return read_statement(DirReader(mirror), [root.public_key])
    except SignatureInvalid as e:
        raise SeedError(
            f"the keys statement in {mirror} does not verify with root key {root.public_key.id_str}: "
            + e.message,
            "sign with the root key that signed it, or remove keys.json and keys.json.minisig to start over",
        ) from e


def write_statement(mirror: Path, root: keysmod.SecretKey, stmt: keyring.KeysStatement) -> Path:
    data = stmt.to_json()
    comment = f"timestamp:{stmt.created}\tfile:{layout.keys_path()}\tkeys-version:{stmt.version}"
    sig = keysmod.sign(root, data, comment)
    path = mirror / layout.keys_path()
    write_atomic(mirror / (layout.keys_path() + ".minisig"), sig.encode())
    write_atomic(path, data)
    log.info("keys statement version %d written to %s", stmt.version, path)
    return path


def _next(
    old: keyring.KeysStatement | None, expires: int, now: float | None
) -> tuple[keyring.KeysStatement, int]:
    created = int(time.time() if now is None else now)
    prev = old.version if old else 0
    stmt = keyring.KeysStatement(
        version=prev + 1,
        created=created,
        expires=created + expires,
        keys=list(old.keys) if old else [],
        revoked=list(old.revoked) if old else [],
    )
    return stmt, prev


def rotate(
    mirror: Path,
    root: keysmod.SecretKey,
    add: list[signature.PublicKey],
    remove: list[str] | None = None,
    expires: int = DEFAULT_EXPIRES,
    now: float | None = None,
) -> Change:
    """Add signing keys and/or stop listing some (without revoking them); re-sign with a new expiry."""
    stmt, prev = _next(_current(mirror, root), expires, now)
    for key in add:
        if key.id_str in stmt.revoked:
            raise SeedError(f"key {key.id_str} is revoked", "make a new signing key (seedboot keygen)")
        if key.id_str not in stmt.key_ids():
            stmt.keys.append(key)
    for kid in remove or []:
        kid = kid.upper()
        if kid not in stmt.key_ids():
            raise SeedError(f"key {kid} is not listed", f"listed keys: {', '.join(stmt.key_ids()) or 'none'}")
        stmt.keys = [k for k in stmt.keys if k.id_str != kid]
    return Change(stmt, prev, write_statement(mirror, root, stmt))


def revoke(
    mirror: Path,
    root: keysmod.SecretKey,
    key_id: str,
    expires: int = DEFAULT_EXPIRES,
    now: float | None = None,
) -> Change:
    """Unlist the key and name it revoked: machines refuse anything it signs from now on."""
    key_id = key_id.upper()
    if not re.fullmatch(r"[0-9A-F]{16}", key_id):
        raise SeedError(
            f"invalid key id {key_id!r}", "a key id is 16 hex digits, as 'seedboot keys show' prints"
        )
    if key_id == root.public_key.id_str:
        raise SeedError("refusing to revoke the root key that signs the statement", "use another root key")
    stmt, prev = _next(_current(mirror, root), expires, now)
    stmt.keys = [k for k in stmt.keys if k.id_str != key_id]
    if key_id not in stmt.revoked:
        stmt.revoked.append(key_id)
    return Change(stmt, prev, write_statement(mirror, root, stmt))
