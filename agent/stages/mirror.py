"""Stage 5: probe every mirror at once and rank them by time to first byte.

Mirrors come from ``seed.mirrors=`` and from the mirror list of the last verified release on
the cache (the signed metadata names its mirrors; the list only orders candidates, trust
comes from the signature in the next stage). When none answers but the cache holds a
verified release, the boot goes on from the cache and says so; the block device keeps
retrying the mirrors with backoff.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

from seedboot.agent import layout
from seedboot.agent.errors import SeedError
from seedboot.agent.release import parse_latest
from seedboot.agent.stages import Context

log = logging.getLogger(__name__)


def need_name(ctx: Context) -> str:
    if not ctx.cmdline.name:
        raise SeedError("no image named on the kernel command line", "add seed.name=NAME to the boot entry")
    return ctx.cmdline.name


def cached_mirrors(ctx: Context, name: str) -> list[str]:
    """The mirror list of the newest release the cache holds (unverified here: only a hint)."""
    try:
        version = (ctx.paths.cache / layout.latest_path(name)).read_text().strip()
        meta = json.loads((ctx.paths.cache / layout.meta_path(name, int(version))).read_bytes())
        urls = meta.get("mirrors", [])
        return [u.rstrip("/") for u in urls if isinstance(u, str) and u.startswith(("http://", "https://"))]
    except (OSError, ValueError, AttributeError):
        return []


def has_cached_release(ctx: Context, name: str) -> bool:
    return (ctx.paths.cache / layout.latest_path(name)).exists()


def run(ctx: Context) -> str:
    name = need_name(ctx)
    if ctx.cmdline.offline:
        return "skipped: seed.offline"
    urls = list(ctx.cmdline.mirrors)
    for u in cached_mirrors(ctx, name):
        if u not in urls:
            urls.append(u)
    if not urls:
        raise SeedError(
            "no mirror to boot from",
            "add seed.mirrors=http://HOST/PATH to the boot entry (or seed.offline to boot from the cache)",
        )
    from seedboot.agent.mirrors import probe

    start = time.monotonic()
    ranked = probe(urls, layout.latest_path(name))
    ctx.timings["wait:mirror"] = time.monotonic() - start
    alive = [m for m in ranked.mirrors if m.ttfb is not None]
    for m in alive:
        with contextlib.suppress(SeedError):  # the trust stage asks again and says what is wrong
            if m.probed is not None:
                ctx.latest[m.url] = parse_latest(m.probed, m.url)
    ctx.mirror_errors = {m.url: m.last_error for m in ranked.mirrors if m.ttfb is None}
    ctx.mirrors = [m.url for m in alive] + [m.url for m in ranked.mirrors if m.ttfb is None]
    if not alive:
        errors = "; ".join(f"{u}: {e}" for u, e in ctx.mirror_errors.items())
        if has_cached_release(ctx, name) and ctx.cache_kind == "disk":
            ctx.mirror = None
            msg = f"no mirror reachable ({errors}); booting from the cache"
            log.warning("%s", msg)
            return msg
        raise SeedError(
            f"no mirror reachable: {errors}",
            "check the network (ping 10.0.2.2 from the rescue shell) and seed.mirrors=",
        )
    ctx.mirror = alive[0].url
    ranks = ", ".join(f"{m.url} {m.ttfb * 1000:.1f}ms" for m in alive if m.ttfb is not None)
    dead = f"; unreachable: {', '.join(ctx.mirror_errors)}" if ctx.mirror_errors else ""
    return f"using {ctx.mirror} ({len(alive)} of {len(urls)} up: {ranks}{dead})"
