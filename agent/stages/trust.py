"""Stage 6: fetch and verify the signed metadata and the index (``release.open_release``).

Trusted keys are the miniroot's ``/etc/seedboot/keys/*.pub``. Online, each ranked mirror is
tried in turn; the verified release is then saved on the cache (laid out like a mirror), so
the block device and any later offline boot read it from there — and check its signature
again. Rollback: a version older than the highest this cache has seen is refused unless
``seed.version=`` names it. Clock: the local clock, with the mirror's ``Date`` header as a
floor and a bounded tolerance; the console line says which was used.

Offline (``seed.offline``, or no mirror reachable), the cache's copy is used. Its expiry is
reported but not enforced: expiry guards against a mirror replaying a stale release, and an
offline boot asks no mirror; refusing would make every offline boot fail after the expiry.
"""

from __future__ import annotations

import logging
import time

from seedboot.agent import layout, rollback
from seedboot.agent.errors import SeedError
from seedboot.agent.release import Release, load_keys, open_release, save_release
from seedboot.agent.signature import PublicKey
from seedboot.agent.stages import Context
from seedboot.agent.stages.mirror import need_name

log = logging.getLogger(__name__)


def trusted_keys(ctx: Context) -> list[PublicKey]:
    paths = sorted(ctx.paths.keys.glob("*.pub"))
    if not paths:
        raise SeedError(
            f"no trusted public key in {ctx.paths.keys}",
            "rebuild the miniroot with seedboot mkinitramfs --pubkey KEY.pub",
        )
    return load_keys(paths)


def from_cache(ctx: Context, name: str, keys: list[PublicKey]) -> tuple[Release, str]:
    from seedboot.agent.reader import DirReader, NotFound

    cache = ctx.paths.cache
    version = ctx.cmdline.version
    if version is None:
        try:
            text = (cache / layout.latest_path(name)).read_text().strip()
        except OSError:
            text = ""
        if not text.isdigit():
            raise SeedError(
                f"the cache ({ctx.cache_kind or 'none'}) holds no verified release of {name!r}",
                "boot once online first (without seed.offline), so the cache gets a copy",
            )
        version = int(text)
    try:
        rel = open_release(
            DirReader(cache),
            name,
            keys,
            version,
            check_expiry=False,
            state_dir=cache,
            allow_older=ctx.cmdline.version is not None,
        )
    except NotFound as e:
        raise SeedError(
            f"version {version} of {name!r} is not in the cache",
            "boot it once online, or pick a cached version",
        ) from e
    expired = rel.meta.expires < time.time()
    note = (
        f"metadata expired on {rel.meta.expires_str()}, accepted offline"
        if expired
        else (f"expires {rel.meta.expires_str()}")
    )
    return rel, f"from the cache; {note}"


def from_mirrors(ctx: Context, name: str, keys: list[PublicKey]) -> tuple[Release, str]:
    from seedboot.agent.reader import DirReader, HttpReader

    errors: list[SeedError] = []
    for url in ctx.mirrors:
        try:
            rel = open_release(
                HttpReader(url),
                name,
                keys,
                ctx.cmdline.version if ctx.cmdline.version is not None else ctx.latest.get(url),
                tolerance=rollback.DEFAULT_TOLERANCE,
                state_dir=ctx.paths.cache,
                allow_older=ctx.cmdline.version is not None,
                keys_fallback=DirReader(ctx.paths.cache),
                # beside the index, saved to the cache, where the block daemon looks first
                with_profile=ctx.cmdline.prefetch == "profile",
            )
        except SeedError as e:
            log.warning("mirror %s: %s", url, e.message)
            errors.append(e)
            continue
        ctx.mirror = url
        return rel, f"from {url}; expires {rel.meta.expires_str()}"
    if len(errors) == 1:
        raise errors[0]
    raise SeedError(
        f"no mirror delivered a verified release of {name!r}: "
        + "; ".join(f"{u}: {e.message}" for u, e in zip(ctx.mirrors, errors, strict=False)),
        errors[0].hint if errors else "check seed.mirrors=",
    )


def run(ctx: Context) -> str:
    name = need_name(ctx)
    keys = trusted_keys(ctx)
    if ctx.cmdline.offline or ctx.mirror is None:
        rel, where = from_cache(ctx, name, keys)
    else:
        start = time.monotonic()
        rel, where = from_mirrors(ctx, name, keys)
        ctx.timings["trust-fetch"] = time.monotonic() - start
        save_release(ctx.paths.cache, rel)
    ctx.release = rel
    for url in rel.meta.mirrors:
        url = url.rstrip("/")
        if url not in ctx.mirrors:
            ctx.mirrors.append(url)
    if rel.clock is not None:
        ctx.clock_note = rel.clock.describe()
    # Chain of trust (agent/tpm.py): TPM rollback counter, then PCR 15 measurement.
    from seedboot.agent import tpm

    measured = tpm.trust_boot(name, rel.meta.version, rel.meta_digest, ctx.cmdline.version is not None)
    notes = "; ".join([*rel.notes, *measured])
    return f"{name} v{rel.meta.version} verified {where}; {notes}"
