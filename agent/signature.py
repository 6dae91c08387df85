"""minisign-compatible Ed25519 keys and signatures (the agent side: parse and verify).

A public key file is ``untrusted comment: ...`` then base64(b"Ed" + key id (8) + key (32)).
A signature file is four lines: an untrusted comment, base64(b"ED" + key id + Ed25519 over
BLAKE2b-512(message)), ``trusted comment: TEXT``, base64(Ed25519 over signature + TEXT).
Debian's stock ``minisign -V -p KEY.pub -m FILE`` verifies what seedboot signs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent import ed25519
from seedboot.agent.errors import FormatError, SignatureInvalid

PK_ALG = b"Ed"
SIG_ALG_HASHED = b"ED"
SIG_ALG_LEGACY = b"Ed"
TRUSTED_PREFIX = "trusted comment: "
UNTRUSTED_PREFIX = "untrusted comment: "


def key_id_str(key_id: bytes) -> str:
    """The key id as minisign prints it (a little-endian u64 in upper-case hex)."""
    return key_id[::-1].hex().upper()


@dataclass(frozen=True)
class PublicKey:
    key_id: bytes
    key: bytes

    @property
    def id_str(self) -> str:
        return key_id_str(self.key_id)

    def to_text(self) -> str:
        blob = base64.b64encode(PK_ALG + self.key_id + self.key).decode()
        return f"{UNTRUSTED_PREFIX}minisign public key {self.id_str}\n{blob}\n"


@dataclass(frozen=True)
class Signature:
    alg: bytes
    key_id: bytes
    sig: bytes
    trusted_comment: str
    global_sig: bytes


def _b64(line: str, what: str) -> bytes:
    try:
        return base64.b64decode(line.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise FormatError(f"{what}: not valid base64") from e


def parse_public_key(text: str, what: str = "public key") -> PublicKey:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].startswith(UNTRUSTED_PREFIX):
        lines = lines[1:]
    if not lines:
        raise FormatError(f"{what}: empty", "pass a minisign public key file (made by 'seedboot keygen')")
    raw = _b64(lines[0], what)
    if len(raw) != 42 or raw[:2] != PK_ALG:
        raise FormatError(f"{what}: not an Ed25519 minisign public key", "pass the .pub file, not the .key")
    return PublicKey(key_id=raw[2:10], key=raw[10:42])


def load_public_key(path: Path | str) -> PublicKey:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise FormatError(f"cannot read public key {p}: {e.strerror}", "check the --pubkey path") from e
    except UnicodeDecodeError as e:
        raise FormatError(f"{p}: not a minisign public key file") from e
    return parse_public_key(text, str(p))


def parse_signature(text: str) -> Signature:
    lines = text.splitlines()
    if len(lines) < 4 or not lines[0].startswith(UNTRUSTED_PREFIX) or not lines[2].startswith(TRUSTED_PREFIX):
        raise FormatError("signature file is not in minisign format (4 lines expected)")
    raw = _b64(lines[1], "signature")
    if len(raw) != 74 or raw[:2] not in (SIG_ALG_HASHED, SIG_ALG_LEGACY):
        raise FormatError("signature: unknown algorithm or wrong length")
    gsig = _b64(lines[3], "global signature")
    if len(gsig) != 64:
        raise FormatError("global signature: wrong length")
    return Signature(
        alg=raw[:2],
        key_id=raw[2:10],
        sig=raw[10:74],
        trusted_comment=lines[2][len(TRUSTED_PREFIX) :],
        global_sig=gsig,
    )


def message_for(alg: bytes, message: bytes) -> bytes:
    return hashlib.blake2b(message, digest_size=64).digest() if alg == SIG_ALG_HASHED else message


def verify(message: bytes, sig_text: str, keys: list[PublicKey], what: str = "file") -> tuple[PublicKey, str]:
    """Verify a minisign signature with one of the trusted keys; return that key and the trusted comment."""
    sig = parse_signature(sig_text)
    by_id = {k.key_id: k for k in keys}
    key = by_id.get(sig.key_id)
    if key is None:
        trusted = ", ".join(k.id_str for k in keys) or "none"
        raise SignatureInvalid(
            f"{what} is signed by key {key_id_str(sig.key_id)}, which is not trusted (trusted: {trusted})",
            "publish with a trusted key, or pass the publisher's public key",
        )
    if not (
        ed25519.verify(key.key, sig.sig, message_for(sig.alg, message))
        and ed25519.verify(key.key, sig.global_sig, sig.sig + sig.trusted_comment.encode())
    ):
        raise SignatureInvalid(
            f"signature of {what} is invalid for key {key.id_str}",
            "the file was altered or signed with another key; do not trust this mirror",
        )
    return key, sig.trusted_comment
