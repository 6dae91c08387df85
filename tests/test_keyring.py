"""Keys that can change: a root key vouches for signing keys through MIRROR/keys.json.

Everything is real: images published with seedboot's publisher, statements written by the
``seedboot keys`` command, verified by the agent's release code (and by stock minisign).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from seedboot.agent import keyring, layout, release, rollback, signature
from seedboot.agent import profile as profilemod
from seedboot.agent.errors import FormatError, MetadataExpired, SeedError, SignatureInvalid
from seedboot.agent.reader import DirReader, HttpReader, NotFound
from seedboot.tools import keyring_tools, keys, publish
from tests.helpers import Nginx, keypair

SEEDBOOT = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "seedboot")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEEDBOOT, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keyring")
    with open(d / "image.bin", "wb") as f:
        f.write(os.urandom(512 * 1024))
    for name in ("root", "a", "b", "other"):
        keypair(d, name)
    return d


def pub(work: Path, name: str) -> signature.PublicKey:
    return signature.load_public_key(work / f"{name}.pub")


def publish_with(work: Path, mirror: Path, signer: str) -> int:
    key = keys.load_secret_key(work / f"{signer}.key")
    return publish.publish(work / "image.bin", mirror, "demo", key, block_size=64 * 1024).version


def open_as(mirror: Path, work: Path, version: int | None = None, **kw: object) -> release.Release:
    """What a seed disk does: it trusts the root public key only."""
    return release.open_release(DirReader(mirror), "demo", [pub(work, "root")], version, **kw)  # type: ignore[arg-type]


def test_root_signed_metadata_needs_no_statement(work: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "m"
    publish_with(work, mirror, "root")
    rel = open_as(mirror, work)
    assert rel.signer == pub(work, "root").id_str and rel.keys_stmt is None
    assert any("root key" in n for n in rel.notes)


def test_rotate_revoke_rotate(work: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "m"
    a, b = pub(work, "a").id_str, pub(work, "b").id_str
    publish_with(work, mirror, "root")
    v2 = publish_with(work, mirror, "a")
    # Signing key A is not vouched for yet: the plain "not trusted" refusal.
    with pytest.raises(SignatureInvalid, match=f"signed by key {a}, which is not trusted"):
        open_as(mirror, work, v2)

    r = run_cli(
        "keys", "rotate", "--mirror", mirror, "--root-key", work / "root.key", "--add", work / "a.pub"
    )
    assert r.returncode == 0, r.stderr
    assert "version 0 -> 1" in r.stdout and a in r.stdout
    # Stock minisign verifies the statement with the root key: the format is plain minisign.
    v = subprocess.run(
        ["minisign", "-V", "-p", str(work / "root.pub"), "-m", str(mirror / "keys.json")],
        capture_output=True,
        text=True,
    )
    assert v.returncode == 0 and "keys-version:1" in v.stdout, v.stdout + v.stderr

    # The seed disk's key list is unchanged (root only), and A's release now opens.
    rel = open_as(mirror, work, v2)
    assert rel.signer == a and rel.keys_stmt is not None and rel.keys_stmt.version == 1
    assert any("keys statement version 1" in n for n in rel.notes)

    r = run_cli(
        "keys", "revoke", "--mirror", mirror, "--root-key", work / "root.key", "--pubkey", work / "a.pub"
    )
    assert r.returncode == 0, r.stderr
    with pytest.raises(SignatureInvalid, match=f"signed by key {a}, revoked by keys statement version 2"):
        open_as(mirror, work, v2)
    # The root-signed version 1 keeps booting.
    assert open_as(mirror, work, 1).meta.version == 1

    # A revoked key cannot come back; a new one can.
    r = run_cli(
        "keys", "rotate", "--mirror", mirror, "--root-key", work / "root.key", "--add", work / "a.pub"
    )
    assert r.returncode == 1 and f"key {a} is revoked" in r.stderr
    r = run_cli(
        "keys", "rotate", "--mirror", mirror, "--root-key", work / "root.key", "--add", work / "b.pub"
    )
    assert r.returncode == 0, r.stderr
    v3 = publish_with(work, mirror, "b")
    rel = open_as(mirror, work, v3)
    assert rel.signer == b and rel.keys_stmt is not None and rel.keys_stmt.version == 3
    assert rel.keys_stmt.revoked == [a]

    # --remove unlists without revoking.
    keyring_tools.rotate(mirror, keys.load_secret_key(work / "root.key"), [], remove=[b])
    with pytest.raises(SignatureInvalid, match=f"signed by key {b}, not listed in keys statement version 4"):
        open_as(mirror, work, v3)


def test_statement_must_be_root_signed(work: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "m"
    publish_with(work, mirror, "root")
    v2 = publish_with(work, mirror, "a")
    # Signing key A vouching for itself is worthless.
    keyring_tools.rotate(mirror, keys.load_secret_key(work / "a.key"), [pub(work, "a")])
    with pytest.raises(SignatureInvalid, match=r"keys statement .* signed by key .*not trusted"):
        open_as(mirror, work, v2)
    # A statement altered after signing is refused.
    (mirror / "keys.json").unlink()
    (mirror / "keys.json.minisig").unlink()
    keyring_tools.rotate(mirror, keys.load_secret_key(work / "root.key"), [pub(work, "b")])
    text = (mirror / "keys.json").read_text()
    (mirror / "keys.json").write_text(
        text.replace(keyring_pubkey_line(work, "b"), keyring_pubkey_line(work, "a"))
    )
    with pytest.raises(SignatureInvalid, match=r"signature of keys statement .* is invalid"):
        open_as(mirror, work, v2)


def keyring_pubkey_line(work: Path, name: str) -> str:
    return (work / f"{name}.pub").read_text().splitlines()[1]


def test_statement_expiry_and_date_header(work: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "m"
    root = keys.load_secret_key(work / "root.key")
    publish_with(work, mirror, "root")
    v2 = publish_with(work, mirror, "a")
    keyring_tools.rotate(mirror, root, [pub(work, "a")], expires=3600, now=time.time() - 7200)
    with pytest.raises(MetadataExpired, match=r"keys statement version 1 from .* expired on"):
        open_as(mirror, work, v2)
    # Within the tolerance the statement is still accepted, and the time used is stated.
    rel = open_as(mirror, work, v2, tolerance=4000)
    assert any("from the local clock (tolerance 4000 s)" in n for n in rel.notes)

    # A machine whose clock is years behind uses the mirror's Date header as a floor.
    keyring_tools.rotate(mirror, root, [pub(work, "a")], expires=86400)
    clock = rollback.choose_time(local=1e9, server_date=time.time(), tolerance=60)
    assert clock.source == "mirror Date header" and abs(clock.now - time.time()) < 60
    rel = open_as(mirror, work, v2, now=clock.now, tolerance=60)
    assert rel.meta.version == v2


def test_date_header_from_nginx(  # type: ignore[no-untyped-def]
    work: Path, tmp_path: Path, nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "m"
    publish_with(work, mirror, "root")
    keyring_tools.rotate(mirror, keys.load_secret_key(work / "root.key"), [pub(work, "a")])
    srv: Nginx = nginx(mirror)
    reader = HttpReader(srv.url)
    rel = release.open_release(reader, "demo", [pub(work, "root")], tolerance=120)
    assert reader.server_date is not None and abs(reader.server_date - time.time()) < 5
    assert rel.clock is not None and rel.clock.source == "local clock"
    # A machine whose clock says 2001 (no RTC battery): the mirror's Date header is the floor,
    # and the statement and metadata are checked against it. (The clock is played through
    # rollback.local_time: setting the real clock back would disturb everything else here.)
    monkeypatch.setattr(rollback, "local_time", lambda: 1_000_000_000.0)
    reader = HttpReader(srv.url)
    rel = release.open_release(reader, "demo", [pub(work, "root")], tolerance=120)
    assert rel.clock is not None and rel.clock.source == "mirror Date header"
    assert abs(rel.clock.now - time.time()) < 5
    assert any("from the mirror Date header" in n for n in rel.notes)
    # A local mirror has no Date header: the 2001 clock is used and said so.
    rel = release.open_release(DirReader(mirror), "demo", [pub(work, "root")], tolerance=120)
    assert rel.clock is not None and rel.clock.source == "local clock" and rel.clock.now == 1e9
    monkeypatch.undo()
    r = run_cli("keys", "show", "--mirror", srv.url, "--pubkey", work / "root.pub")
    assert r.returncode == 0, r.stderr
    assert "keys statement version 1" in r.stdout and pub(work, "a").id_str in r.stdout
    r = run_cli("keys", "show", "--mirror", srv.url, "--pubkey", work / "other.pub")
    assert r.returncode == 1 and "not trusted" in r.stderr


def test_statement_rollback_refused(work: Path, tmp_path: Path) -> None:
    mirror, state = tmp_path / "m", tmp_path / "state"
    root = keys.load_secret_key(work / "root.key")
    publish_with(work, mirror, "root")
    v2 = publish_with(work, mirror, "a")
    keyring_tools.rotate(mirror, root, [pub(work, "a")])
    old = {n: (mirror / n).read_bytes() for n in ("keys.json", "keys.json.minisig")}
    keyring_tools.rotate(mirror, root, [pub(work, "a")])
    open_as(mirror, work, v2, state_dir=state)
    assert rollback.load_state(state).keys == 2
    # A mirror replaying statement version 1 (still root-signed, unexpired) is refused.
    for n, data in old.items():
        (mirror / n).write_bytes(data)
    with pytest.raises(SignatureInvalid, match=r"version 1 from .* is older than version 2 seen before"):
        open_as(mirror, work, v2, state_dir=state)
    # Without the state (another machine) the same statement is fine.
    assert open_as(mirror, work, v2).keys_stmt is not None


def test_offline_uses_cached_statement(work: Path, tmp_path: Path) -> None:
    mirror, cache = tmp_path / "m", tmp_path / "cache"
    publish_with(work, mirror, "root")
    v2 = publish_with(work, mirror, "a")
    keyring_tools.rotate(mirror, keys.load_secret_key(work / "root.key"), [pub(work, "a")])
    rel = open_as(mirror, work, v2, state_dir=cache)
    release.save_release(cache, rel)
    assert (cache / "keys.json").read_bytes() == (mirror / "keys.json").read_bytes()
    # A mirror that lost its statement: the cache's verified copy vouches for the key.
    (mirror / "keys.json").unlink()
    with pytest.raises(SignatureInvalid, match="not trusted"):
        open_as(mirror, work, v2, state_dir=cache)
    rel = open_as(mirror, work, v2, state_dir=cache, keys_fallback=DirReader(cache))
    assert rel.keys_stmt is not None and rel.keys_stmt.version == 1
    # Offline: the cache serves as the mirror.
    shutil.rmtree(mirror)
    rel = open_as(cache, work, v2, state_dir=cache)
    assert rel.keys_stmt is not None and rel.signer == pub(work, "a").id_str


def test_release_files_fetched_together_and_the_profile_beside_the_index(  # type: ignore[no-untyped-def]
    work: Path, tmp_path: Path, nginx
) -> None:
    """The metadata and its signature in one round trip, then the index and the boot profile
    in one (the miniroot's trust stage saves the profile where the block daemon looks first)."""
    mirror, cache = tmp_path / "m", tmp_path / "cache"
    prof = tmp_path / "boot.profile"
    prof.write_bytes(profilemod.encode([3, 1, 2], nblocks=8))
    key = keys.load_secret_key(work / "root.key")
    publish.publish(work / "image.bin", mirror, "demo", key, block_size=64 * 1024, profile_file=prof)
    srv: Nginx = nginx(mirror)
    reader = HttpReader(srv.url)
    latest = (mirror / layout.latest_path("demo")).read_bytes()
    got = reader.get_many([layout.latest_path("demo"), "demo/nothing", layout.latest_path("demo")])
    assert got[0] == got[2] == latest and isinstance(got[1], NotFound)
    rel = release.open_release(reader, "demo", [pub(work, "root")], with_profile=True)
    assert rel.meta.profile is not None
    on_mirror = mirror / layout.profile_path("demo", rel.meta.profile)
    assert rel.profile_bytes == on_mirror.read_bytes() and profilemod.parse(rel.profile_bytes) == [3, 1, 2]
    assert release.open_release(reader, "demo", [pub(work, "root")]).profile_bytes is None  # not asked
    release.save_release(cache, rel)
    assert (cache / layout.profile_path("demo", rel.meta.profile)).read_bytes() == rel.profile_bytes
    # the cache serves as a mirror, profile included (the block daemon's --cached-release)
    again = release.open_release(DirReader(cache), "demo", [pub(work, "root")], with_profile=True)
    assert again.profile_bytes == rel.profile_bytes
    # a profile that does not match its signed digest is left out, not trusted: the daemon
    # then looks for a good one itself; the release is still good
    on_mirror.write_bytes(profilemod.encode([7], nblocks=8))
    bad = release.open_release(HttpReader(srv.url), "demo", [pub(work, "root")], with_profile=True)
    assert bad.profile_bytes is None and bad.meta == rel.meta
    # a signature missing from the mirror: refused as before, with the version named
    (mirror / layout.sig_path("demo", rel.meta.version)).unlink()
    with pytest.raises(SeedError, match=f"version {rel.meta.version} of 'demo' is not on"):
        release.open_release(HttpReader(srv.url), "demo", [pub(work, "root")])


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        (b"{not json", "keys.json: not JSON"),
        (b"[1, 2]", "keys.json: not a JSON object"),
        (b'{"type": "seedboot-keys", "format": true}', "keys.json: field 'format' missing or not int"),
        (
            b'{"type": "seedboot-keys", "format": 1, "keys": [], "version": -3, "created": 0, "expires": 0}',
            "keys.json: field 'version' is negative",
        ),
    ],
)
def test_malformed_statement_says_what_is_wrong(statement: bytes, message: str) -> None:
    with pytest.raises(FormatError) as e:
        keyring.parse(statement, "keys.json")
    assert e.value.message.startswith(message), e.value.message
