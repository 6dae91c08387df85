"""The mirror format's pure parts: index round trip and checks, block verify, signatures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seedboot.agent import blocks, index, metadata, signature
from seedboot.agent.errors import BlockInvalid, FormatError, MetadataExpired, SignatureInvalid
from seedboot.tools import keys


@given(
    st.sampled_from([64 * 1024, 256 * 1024, 4 * 1024 * 1024]),
    st.integers(min_value=0, max_value=50 * 1024 * 1024),
    st.data(),
)
def test_index_round_trip(block_size: int, image_size: int, data: st.DataObject) -> None:
    n = index.expected_blocks(image_size, block_size)
    idx = index.Index(block_size=block_size, image_size=image_size)
    for _ in range(n):
        hole = data.draw(st.booleans())
        idx.digests.append(index.HOLE_DIGEST if hole else data.draw(st.binary(min_size=32, max_size=32)))
        idx.lengths.append(0 if hole else data.draw(st.integers(1, index.max_stored_len(block_size))))
    back = index.decode(idx.encode())
    assert back == idx
    assert sum(back.plain_len(i) for i in range(back.nblocks)) == image_size


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:-1], "bytes"),
        (lambda b: b[:4] + b"\x00\x09" + b[6:], "format version 9"),
        (lambda b: b[:8] + (3000).to_bytes(4, "big") + b[12:], "block size"),
        (lambda b: b[:12] + (10 * 1024 * 1024).to_bytes(8, "big") + b[20:], "do not add up"),
    ],
)
def test_index_rejects_bad_input(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    idx = index.Index(
        block_size=65536, image_size=65536 * 3 - 5, digests=[b"\1" * 32] * 3, lengths=[10, 20, 30]
    )
    with pytest.raises(FormatError, match=message):
        index.decode(mutate(idx.encode()))


def test_block_verify_catches_corruption() -> None:
    plain = b"abc" * 30000
    stored = blocks.compress(plain)
    name = blocks.name_of(stored)
    assert blocks.verify(stored, name, len(stored), len(plain)) == plain
    bad = bytearray(stored)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(BlockInvalid, match="digest mismatch"):
        blocks.verify(bytes(bad), name, len(stored), len(plain))
    with pytest.raises(BlockInvalid, match="bytes, index says"):
        blocks.verify(stored[:-3], name, len(stored), len(plain))
    with pytest.raises(BlockInvalid, match="expected"):
        blocks.verify(stored, name, len(stored), len(plain) + 1)


def test_signature_interoperates_with_minisign(tmp_path: Path) -> None:
    key_path, pub_path, _ = keys.write_keypair(tmp_path / "k")
    assert (key_path.stat().st_mode & 0o777) == 0o600
    msg = tmp_path / "m.json"
    msg.write_bytes(b'{"hello": 1}\n')
    sk = keys.load_secret_key(key_path)
    (tmp_path / "m.json.minisig").write_text(
        keys.sign(sk, msg.read_bytes(), keys.default_trusted_comment("m.json"))
    )
    r = subprocess.run(
        ["minisign", "-V", "-p", str(pub_path), "-m", str(msg)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    # and the other way: stock minisign signs with our secret key, our verifier accepts it
    subprocess.run(
        ["minisign", "-S", "-W", "-s", str(key_path), "-m", str(msg), "-x", str(tmp_path / "s2")], check=True
    )
    pk = signature.load_public_key(pub_path)
    key, comment = signature.verify(msg.read_bytes(), (tmp_path / "s2").read_text(), [pk])
    assert key == pk and "m.json" in comment
    # a tampered message, or another key, is refused
    with pytest.raises(SignatureInvalid, match="invalid"):
        signature.verify(b'{"hello": 2}\n', (tmp_path / "s2").read_text(), [pk])
    _, other_pub, _ = keys.write_keypair(tmp_path / "other")
    with pytest.raises(SignatureInvalid, match="not trusted"):
        signature.verify(
            msg.read_bytes(), (tmp_path / "s2").read_text(), [signature.load_public_key(other_pub)]
        )


def test_secret_key_with_loose_mode_is_refused(tmp_path: Path) -> None:
    key_path, _, _ = keys.write_keypair(tmp_path / "k")
    key_path.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        keys.load_secret_key(key_path)


def test_metadata_verify_and_expiry(tmp_path: Path) -> None:
    key_path, pub_path, _ = keys.write_keypair(tmp_path / "k")
    meta = metadata.Metadata(
        name="demo",
        version=3,
        created=1000,
        expires=2000,
        index="a" * 64,
        index_size=100,
        image_size=5,
        block_size=65536,
        mirrors=["http://m1/"],
    )
    data = meta.to_json()
    sig = keys.sign(keys.load_secret_key(key_path), data, "t")
    pk = signature.load_public_key(pub_path)
    assert metadata.verify(data, sig, [pk], "demo", 3) == meta
    with pytest.raises(FormatError, match="not 'other'"):
        metadata.verify(data, sig, [pk], "other")
    metadata.check_expiry(meta, now=1999)
    with pytest.raises(MetadataExpired, match="expired on"):
        metadata.check_expiry(meta, now=2001)
    metadata.check_expiry(meta, now=2001, tolerance=60)


def test_libcrypto_ed25519_agrees_with_cryptography() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from seedboot.agent import ed25519

    priv = Ed25519PrivateKey.generate()
    pub = priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    for msg in (b"", b"x", bytes(range(256)) * 100):
        sig = priv.sign(msg)
        assert ed25519.verify(pub, sig, msg)
        assert not ed25519.verify(pub, sig, msg + b"!")
        assert not ed25519.verify(pub, sig[:-1] + bytes([sig[-1] ^ 1]), msg)
        assert not ed25519.verify(pub[:31] + b"\0", sig, msg)
    assert not ed25519.verify(pub, b"short", b"x")
