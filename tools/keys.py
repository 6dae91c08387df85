"""Key generation and signing (the publisher side of agent/signature.py).

The secret key is written in minisign's format without a password (kdf "\\0\\0"), mode 0600.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from seedboot.agent import signature
from seedboot.agent.errors import FormatError, SeedError

_KDF_NONE = b"\0\0"
_CHK_ALG = b"B2"


@dataclass(frozen=True)
class SecretKey:
    key_id: bytes
    seed: bytes  # the 32-byte Ed25519 seed
    public: bytes

    @property
    def public_key(self) -> signature.PublicKey:
        return signature.PublicKey(key_id=self.key_id, key=self.public)

    def _checksum(self) -> bytes:
        return hashlib.blake2b(
            signature.PK_ALG + self.key_id + self.seed + self.public, digest_size=32
        ).digest()

    def to_text(self) -> str:
        blob = (
            signature.PK_ALG
            + _KDF_NONE
            + _CHK_ALG
            + bytes(32)  # kdf salt
            + bytes(8)  # kdf opslimit
            + bytes(8)  # kdf memlimit
            + self.key_id
            + self.seed
            + self.public
            + self._checksum()
        )
        return (
            f"untrusted comment: minisign secret key {self.public_key.id_str} (seedboot, no password)\n"
            + (base64.b64encode(blob).decode() + "\n")
        )


def generate() -> SecretKey:
    priv = Ed25519PrivateKey.generate()
    seed = priv.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pub = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SecretKey(key_id=os.urandom(8), seed=seed, public=pub)


def write_keypair(prefix: Path | str, force: bool = False) -> tuple[Path, Path, SecretKey]:
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (key_path, pub_path):
        if p.exists() and not force:
            raise SeedError(f"{p} exists", "refusing to overwrite a key; remove it or pick another --out")
    key = generate()
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.to_text())
    os.chmod(key_path, 0o600)
    pub_path.write_text(key.public_key.to_text())
    return key_path, pub_path, key


def load_secret_key(path: Path | str) -> SecretKey:
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text()
    except OSError as e:
        raise SeedError(f"cannot read secret key {p}: {e.strerror}", "check the --key path") from e
    except UnicodeDecodeError as e:
        raise FormatError(f"{p}: not a minisign secret key") from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SeedError(
            f"secret key {p} is readable by others (mode {stat.S_IMODE(st.st_mode):o})",
            f"a key without a password must be private: chmod 600 {p}",
        )
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("untrusted comment:")]
    try:
        raw = base64.b64decode(lines[0], validate=True) if lines else b""
    except ValueError as e:
        raise FormatError(f"{p}: not a minisign secret key") from e
    if len(raw) != 158 or raw[:2] != signature.PK_ALG:
        raise FormatError(
            f"{p}: not a minisign Ed25519 secret key", "pass the .key file made by 'seedboot keygen'"
        )
    if raw[2:4] != _KDF_NONE:
        raise SeedError(
            f"{p} is password-protected", "seedboot signs unattended: use a key from 'seedboot keygen'"
        )
    key = SecretKey(key_id=raw[54:62], seed=raw[62:94], public=raw[94:126])
    if key._checksum() != raw[126:158]:
        raise FormatError(f"{p}: checksum mismatch, the key file is damaged")
    return key


def sign(key: SecretKey, message: bytes, trusted_comment: str, untrusted_comment: str = "") -> str:
    """A minisign signature file (prehashed 'ED' form) over message."""
    if "\n" in trusted_comment or "\n" in untrusted_comment:
        raise SeedError("signature comments must be one line")
    priv = Ed25519PrivateKey.from_private_bytes(key.seed)
    sig = priv.sign(signature.message_for(signature.SIG_ALG_HASHED, message))
    gsig = priv.sign(sig + trusted_comment.encode())
    untrusted = untrusted_comment or f"signature from seedboot secret key {key.public_key.id_str}"
    return (
        f"untrusted comment: {untrusted}\n"
        + base64.b64encode(signature.SIG_ALG_HASHED + key.key_id + sig).decode()
        + "\n"
        + f"trusted comment: {trusted_comment}\n"
        + base64.b64encode(gsig).decode()
        + "\n"
    )


def default_trusted_comment(filename: str) -> str:
    return f"timestamp:{int(time.time())}\tfile:{filename}"
