"""Open one signed version of an image: metadata verified, expiry checked, index verified.

Nothing of an image is trusted before ``open_release`` returns: the signature is checked
over the exact metadata bytes, then the index must hash to the digest the metadata names.

Who may sign: a trusted (root) key directly, or a signing key that the mirror's root-signed
keys statement lists and does not revoke (keyring.py). With a state directory, versions
older than the highest seen are refused (rollback.py) and the highest seen are recorded.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from seedboot.agent import index as indexmod
from seedboot.agent import keyring, layout, metadata, rollback, signature
from seedboot.agent.atomic import write_atomic
from seedboot.agent.errors import FormatError, SeedError
from seedboot.agent.reader import NotFound, Reader, first_error, get_all

log = logging.getLogger(__name__)


@dataclass
class Release:
    meta: metadata.Metadata
    meta_bytes: bytes
    sig_text: str
    index: indexmod.Index
    index_bytes: bytes
    source: str
    signer: str = ""  # key id of the metadata's signer
    keys_stmt: keyring.KeysStatement | None = None  # the statement that vouched for the signer
    keys_bytes: bytes | None = None
    keys_sig: str | None = None
    clock: rollback.Clock | None = None
    notes: list[str] = field(default_factory=list)  # trust decisions, one console line each
    # the boot profile the metadata names, checked against its digest (``with_profile``)
    profile_bytes: bytes | None = None

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
        data = reader.get(layout.latest_path(name))
    except NotFound as e:
        raise SeedError(
            f"image {name!r} is not on mirror {reader.location}", "check --name (seedboot info lists images)"
        ) from e
    return parse_latest(data, f"{reader.location}/{layout.latest_path(name)}")


def parse_latest(data: bytes, what: str) -> int:
    """The version number a ``NAME/latest`` file holds (unsigned: only which metadata to fetch;
    the signed metadata then says which version it is)."""
    text = data.decode("ascii", "replace").strip()
    if not text.isdigit():
        raise FormatError(f"{what} is not a version number: {text[:40]!r}")
    return int(text)


def open_release(
    reader: Reader,
    name: str,
    keys: list[signature.PublicKey],
    version: int | None = None,
    now: float | None = None,
    tolerance: int = 0,
    check_expiry: bool = True,
    state_dir: Path | None = None,
    allow_older: bool = False,
    keys_fallback: Reader | None = None,
    with_profile: bool = False,
) -> Release:
    """``keys`` are the trusted root keys. ``state_dir`` (the cache) enables rollback protection;
    ``keys_fallback`` (the cache, laid out like a mirror) supplies the last verified keys
    statement when the mirror has none (offline boots). ``with_profile`` also fetches the boot
    profile the metadata names, beside the index (``Release.profile_bytes``; None if it is
    missing or does not match its digest: the block daemon then tries again).

    The metadata and its signature are fetched together, then the index (and profile): two
    round trips where it took three (four with the profile, which the daemon fetched after it
    started), 0.1 s each at 100 ms."""
    layout.check_name(name)
    state = rollback.load_state(state_dir)
    if version is None:
        version = latest_version(reader, name)
    what = f"{reader.location}/{layout.meta_path(name, version)}"
    got = get_all(reader, [layout.meta_path(name, version), layout.sig_path(name, version)])
    err = first_error(got)
    if isinstance(err, NotFound):
        raise SeedError(
            f"version {version} of {name!r} is not on {reader.location}", "seedboot info lists versions"
        ) from err
    if err is not None:
        raise err
    meta_bytes, sig_raw = got
    assert isinstance(meta_bytes, bytes) and isinstance(sig_raw, bytes)  # no error, so bytes
    sig_text = sig_raw.decode("utf-8", "replace")
    # After the first fetches: an HTTP mirror's Date header is known by now.
    clock = rollback.Clock(now, "given time", tolerance) if now is not None else _clock(reader, tolerance)
    notes: list[str] = []
    signer = keyring.signer_id(sig_text)
    stmt: keyring.KeysStatement | None = None
    stmt_files: tuple[bytes, str] | None = None
    roots = {k.id_str for k in keys}
    if signer in roots:
        meta = metadata.verify(meta_bytes, sig_text, keys, name, version, what=what)
        notes.append(f"signed by root key {signer}")
    else:
        stmt, stmt_files = _load_statement(reader, keys_fallback, keys, clock, state, check_expiry)
        if stmt is None:
            # No statement anywhere: the plain "not trusted" refusal says what to do.
            meta = metadata.verify(meta_bytes, sig_text, keys, name, version, what=what)
        else:
            key = keyring.key_for(stmt, signer, f"{name} version {version}")
            meta = metadata.verify(meta_bytes, sig_text, [key], name, version, what=what)
            notes.append(f"signed by key {signer}, listed in keys statement version {stmt.version}")
    if check_expiry:
        metadata.check_expiry(meta, now=clock.now, tolerance=clock.tolerance)
        notes.append(clock.describe())
    notes.append(state.check_image(name, version, allow_older))
    paths = [layout.index_path(name, meta.index)]
    if with_profile and meta.profile is not None:
        paths.append(layout.profile_path(name, meta.profile))
    got = get_all(reader, paths)
    if isinstance(got[0], SeedError):
        raise got[0]
    index_bytes = got[0]
    profile_bytes = checked_profile(got[1], meta.profile, reader.location) if len(got) > 1 else None
    if hashlib.sha256(index_bytes).hexdigest() != meta.index:
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
    changed = state.note_image(name, version)
    if stmt is not None:
        changed = state.note_keys(stmt.version) or changed
    if changed:
        state.save()
    return Release(
        meta,
        meta_bytes,
        sig_text,
        idx,
        index_bytes,
        reader.location,
        signer=signer,
        keys_stmt=stmt,
        keys_bytes=stmt_files[0] if stmt_files else None,
        keys_sig=stmt_files[1] if stmt_files else None,
        clock=clock if check_expiry else None,
        notes=notes,
        profile_bytes=profile_bytes,
    )


def checked_profile(got: bytes | SeedError, digest: str | None, where: str) -> bytes | None:
    """A fetched boot profile if it is the one the metadata signs (DIGEST), else None, said in
    the log: a profile is only ever a hint, so a missing or wrong one is not an error."""
    if isinstance(got, SeedError):
        log.info("boot profile from %s: %s", where, got.message)
        return None
    if hashlib.sha256(got).hexdigest() != digest:
        log.warning("boot profile %s from %s does not match its signed digest", str(digest)[:12], where)
        return None
    return got


def _clock(reader: Reader, tolerance: int) -> rollback.Clock:
    server_date = getattr(reader, "server_date", None)
    return rollback.choose_time(server_date=server_date, tolerance=min(tolerance, rollback.MAX_TOLERANCE))


def _load_statement(
    reader: Reader,
    fallback: Reader | None,
    roots: list[signature.PublicKey],
    clock: rollback.Clock,
    state: rollback.TrustState,
    check_expiry: bool,
) -> tuple[keyring.KeysStatement | None, tuple[bytes, str] | None]:
    """The mirror's keys statement, else the fallback's (the cache's last verified copy).

    A statement that fails (bad signature, expired, older than seen) is an error, never
    skipped: skipping could fall back to an older statement that lists a revoked key."""
    for src in (reader, fallback):
        if src is None:
            continue
        try:
            data = src.get(layout.keys_path())
            sig = src.get(layout.keys_path() + ".minisig").decode("utf-8", "replace")
        except NotFound:
            log.info("no keys statement on %s", src.location)
            continue
        what = f"keys statement {src.location}/{layout.keys_path()}"
        stmt = keyring.verify(data, sig, roots, what)
        now = clock.now if check_expiry else 0.0
        keyring.check_fresh(stmt, now, clock.tolerance, min_version=state.keys, where=src.location)
        log.info("keys statement version %d from %s: keys %s", stmt.version, src.location, stmt.key_ids())
        return stmt, (data, sig)
    return None, None


def save_release(root: Path, rel: Release, set_latest: bool = True) -> None:
    """Keep a verified release in a directory laid out like a mirror (a cache can serve as one)."""
    name, version = rel.meta.name, rel.meta.version
    write_atomic(root / layout.index_path(name, rel.meta.index), rel.index_bytes)
    if rel.keys_bytes is not None and rel.keys_sig is not None:
        write_atomic(root / (layout.keys_path() + ".minisig"), rel.keys_sig.encode())
        write_atomic(root / layout.keys_path(), rel.keys_bytes)
    write_atomic(root / layout.sig_path(name, version), rel.sig_text.encode())
    write_atomic(root / layout.meta_path(name, version), rel.meta_bytes)
    if rel.profile_bytes is not None and rel.meta.profile is not None:
        # not synced: a torn copy fails its digest when read, and is fetched again
        write_atomic(root / layout.profile_path(name, rel.meta.profile), rel.profile_bytes, sync=False)
    if set_latest:
        write_atomic(root / layout.latest_path(name), f"{version}\n".encode())
