"""The keys statement: which signing keys a long-lived (offline) root key vouches for.

A seed disk and its miniroot carry only the root public key(s). The publisher's day-to-day
signing key is named in ``MIRROR/keys.json``, signed by a root key (``keys.json.minisig``):

    {"format": 1, "type": "seedboot-keys", "version": 3,
     "created": 1700000000, "expires": 1731536000,
     "keys": [{"id": "8A1F...", "pubkey": "RWSKH..."}],     # minisign public key line
     "revoked": ["0C77..."]}                                  # key ids, as minisign prints them

Metadata signed directly by a root key needs no statement. Metadata signed by another key
is accepted only if an unexpired statement, signed by a root key and not older than the
newest statement this machine has seen, lists that key and does not revoke it. So a
publisher rotates or revokes signing keys without rebuilding seed disks; only replacing
the root key itself needs new seed disks (a statement cannot take back a root key: whoever
holds it signs metadata directly, which needs no statement).

``version`` only goes up: the agent remembers the highest one seen (see rollback.py), so a
mirror cannot replay an old statement that still lists a since-revoked key.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from seedboot.agent import signature
from seedboot.agent.errors import FormatError, MetadataExpired, SignatureInvalid
from seedboot.agent.metadata import json_field, json_object

log = logging.getLogger(__name__)

KEYS_FORMAT = 1
KEYS_TYPE = "seedboot-keys"


@dataclass
class KeysStatement:
    version: int
    created: int
    expires: int
    keys: list[signature.PublicKey] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    format: int = KEYS_FORMAT

    def to_json(self) -> bytes:
        d: dict[str, Any] = {
            "format": self.format,
            "type": KEYS_TYPE,
            "version": self.version,
            "created": self.created,
            "expires": self.expires,
            "keys": [{"id": k.id_str, "pubkey": pubkey_line(k)} for k in self.keys],
            "revoked": sorted(set(self.revoked)),
        }
        return (json.dumps(d, sort_keys=True, indent=1) + "\n").encode()

    def expires_str(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires))

    def key_ids(self) -> list[str]:
        return [k.id_str for k in self.keys]


def pubkey_line(key: signature.PublicKey) -> str:
    """The base64 line of a minisign public key file (what ``minisign -P`` takes)."""
    return key.to_text().splitlines()[1]


def _int(d: dict[str, Any], key: str, what: str) -> int:
    v: int = json_field(d, key, int, what)
    if v < 0:
        raise FormatError(f"{what}: field {key!r} is negative")
    return v


def parse(data: bytes, what: str = "keys statement") -> KeysStatement:
    d = json_object(data, what)
    if d.get("type") != KEYS_TYPE:
        raise FormatError(f"{what}: not a seedboot keys statement")
    fmt = _int(d, "format", what)
    if fmt != KEYS_FORMAT:
        raise FormatError(f"{what}: keys statement format {fmt} not supported", "update seedboot")
    raw_keys = d.get("keys")
    if not isinstance(raw_keys, list):
        raise FormatError(f"{what}: field 'keys' must be a list")
    keys = []
    for entry in raw_keys:
        if not isinstance(entry, dict) or not isinstance(entry.get("pubkey"), str):
            raise FormatError(f"{what}: each key needs a 'pubkey' (minisign public key line)")
        key = signature.parse_public_key(entry["pubkey"], f"{what}: key {entry.get('id')}")
        if entry.get("id") != key.id_str:
            raise FormatError(f"{what}: key id {entry.get('id')!r} does not match its key {key.id_str}")
        keys.append(key)
    revoked = d.get("revoked", [])
    if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
        raise FormatError(f"{what}: field 'revoked' must be a list of key ids")
    return KeysStatement(
        version=_int(d, "version", what),
        created=_int(d, "created", what),
        expires=_int(d, "expires", what),
        keys=keys,
        revoked=[r.upper() for r in revoked],
        format=fmt,
    )


def verify(
    data: bytes, sig_text: str, roots: list[signature.PublicKey], what: str = "keys statement"
) -> KeysStatement:
    """Only a root key may sign a statement, and never one the statement itself revokes."""
    signer, _ = signature.verify(data, sig_text, roots, what)
    stmt = parse(data, what)
    if signer.id_str in stmt.revoked:
        raise SignatureInvalid(
            f"{what} version {stmt.version} is signed by root key {signer.id_str}, which it revokes",
            "sign the keys statement with a root key that is not revoked",
        )
    return stmt


def check_fresh(
    stmt: KeysStatement, now: float, tolerance: int = 0, min_version: int = 0, where: str = ""
) -> None:
    what = f"keys statement version {stmt.version}" + (f" from {where}" if where else "")
    if now > stmt.expires + tolerance:
        raise MetadataExpired(
            f"{what} expired on {stmt.expires_str()}",
            "the publisher must re-sign it (seedboot keys rotate), or check this machine's clock",
        )
    if stmt.version < min_version:
        raise SignatureInvalid(
            f"{what} is older than version {min_version} seen before on this machine",
            "the mirror replays an old keys statement; use another mirror",
        )


def signer_id(sig_text: str) -> str:
    """The key id a minisign signature claims (not yet verified)."""
    return signature.parse_signature(sig_text).key_id[::-1].hex().upper()


def key_for(stmt: KeysStatement, key_id: str, what: str) -> signature.PublicKey:
    """The listed, unrevoked key with this id, or a clear refusal naming the statement version."""
    if key_id in stmt.revoked:
        raise SignatureInvalid(
            f"{what} is signed by key {key_id}, revoked by keys statement version {stmt.version}",
            "the publisher must re-sign with a current key; do not trust this mirror",
        )
    for k in stmt.keys:
        if k.id_str == key_id:
            return k
    listed = ", ".join(stmt.key_ids()) or "none"
    raise SignatureInvalid(
        f"{what} is signed by key {key_id}, not listed in keys statement version {stmt.version} "
        f"(listed: {listed})",
        "publish with a current signing key, or rotate this key in (seedboot keys rotate)",
    )
