"""Site hooks: executables run at fixed points of the boot, without patching the agent.

Points: ``pre-<stage>`` and ``post-<stage>`` for every stage, except ``post-switch`` (the
switch execs the new init). Hooks live in ``<dir>/<point>.d/``; the built-in directory
(``/etc/seedboot/hooks``, the source tree's ``hooks/``) comes first, the seed disk's own
(``/knxblock/hooks``, present once the cache stage has mounted it) overrides it: a file
of the same name replaces the built-in one, an empty file of that name disables it
(dracut's rule). The merged set runs in name order. See ``hooks/README.md``.

A hook is optional when its name ends in ``.optional`` or a line ``# seedboot: optional``
appears in its first 4 KiB; a failing optional hook is logged and the boot goes on. A
``# seedboot: timeout=N`` line sets its time limit (default ``DEFAULT_TIMEOUT``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent.cmdline import STAGE_NAMES
from seedboot.agent.errors import SeedError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 600.0
OUTPUT_TAIL = 2000
PATH = "/run/seedboot/bin:/bin:/sbin:/usr/bin:/usr/sbin"
POINTS: tuple[str, ...] = tuple(
    f"{when}-{stage}"
    for stage in STAGE_NAMES
    for when in ("pre", "post")
    if (when, stage) != ("post", "switch")
)


class HookFailed(SeedError):
    """A hook exited non-zero or ran out of time."""


@dataclass(frozen=True)
class Hook:
    name: str
    path: Path
    optional: bool
    timeout: float


@dataclass(frozen=True)
class HookResult:
    hook: Hook
    returncode: int | None  # None: killed at the time limit
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _header(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode("utf-8", "replace")
    except OSError:
        return ""


def describe(path: Path) -> Hook:
    head = _header(path)
    optional = path.name.endswith(".optional")
    timeout = DEFAULT_TIMEOUT
    for line in head.splitlines():
        line = line.strip()
        if not line.startswith("#"):
            continue
        text = line.lstrip("#").strip()
        if not text.startswith("seedboot:"):
            continue
        for word in text[len("seedboot:") :].split():
            if word == "optional":
                optional = True
            elif word.startswith("timeout="):
                try:
                    timeout = min(MAX_TIMEOUT, max(1.0, float(word[len("timeout=") :])))
                except ValueError:
                    log.warning("hook %s: ignoring bad %r", path, word)
    return Hook(path.name, path, optional, timeout)


def _skip(name: str) -> bool:
    return name.startswith(".") or name.endswith(("~", ".swp", ".dpkg-old", ".rpmsave"))


def collect(point: str, dirs: Sequence[Path]) -> list[Hook]:
    """The hooks of one point: later directories override earlier ones by file name."""
    if point not in POINTS:
        raise SeedError(f"unknown hook point {point!r}", "points: " + ", ".join(POINTS))
    chosen: dict[str, Path] = {}
    for d in dirs:
        pdir = d / f"{point}.d"
        try:
            names = sorted(os.listdir(pdir))
        except OSError:
            continue
        for name in names:
            if _skip(name):
                continue
            path = pdir / name
            if not path.is_file():
                continue
            if path.stat().st_size == 0:
                if chosen.pop(name, None) is not None:
                    log.info("hook %s/%s disabled by an empty file in %s", point, name, d)
                continue
            if name in chosen:
                log.info("hook %s/%s from %s overrides %s", point, name, d, chosen[name])
            chosen[name] = path
    hooks = []
    for name in sorted(chosen):
        path = chosen[name]
        if not os.access(path, os.X_OK):
            raise HookFailed(f"hook {point}/{name} ({path}) is not executable", f"chmod +x {path}")
        hooks.append(describe(path))
    return hooks


def run_one(hook: Hook, env: Mapping[str, str], point: str) -> HookResult:
    start = time.monotonic()
    full_env = {"PATH": PATH, **env, "SEED_POINT": point, "SEED_HOOK": hook.name}
    try:
        proc = subprocess.Popen(
            [str(hook.path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd="/",
            start_new_session=True,  # the time limit kills what the hook started, too
        )
    except OSError as e:
        return HookResult(hook, 127, f"cannot run: {e.strerror}", time.monotonic() - start)
    try:
        out, _ = proc.communicate(timeout=hook.timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    text = out.decode("utf-8", "replace")
    return HookResult(hook, code, text, time.monotonic() - start)


def run_point(point: str, dirs: Sequence[Path], env: Mapping[str, str]) -> list[HookResult]:
    """Run the hooks of one point in name order; raise HookFailed at the first required failure."""
    results = []
    for hook in collect(point, dirs):
        r = run_one(hook, env, point)
        results.append(r)
        for line in r.output.splitlines():
            log.info("hook %s/%s: %s", point, hook.name, line)
        if r.ok:
            log.info("hook %s/%s ok in %.2fs", point, hook.name, r.seconds)
            continue
        why = (
            f"timed out after {hook.timeout:.0f}s" if r.returncode is None else f"exited with {r.returncode}"
        )
        tail = r.output.strip()[-OUTPUT_TAIL:]
        if hook.optional:
            log.warning("optional hook %s/%s %s; going on", point, hook.name, why)
            continue
        raise HookFailed(
            f"hook {point}/{hook.name} {why}" + (f": {tail}" if tail else " (no output)"),
            f"fix or remove {hook.path}, or mark it optional (see hooks/README.md)",
        )
    return results
