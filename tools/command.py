"""Running the publisher's build tools (qemu-img, sfdisk, depmod, zstd...): one place that turns
a missing program or a failed run into a SeedError a user can act on."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from seedboot.agent.errors import SeedError

log = logging.getLogger(__name__)

SETUP_HINT = "run scripts/setup to install the build tools"


def run(
    cmd: Sequence[str],
    *,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    hint: str = SETUP_HINT,
) -> str:
    """CMD's standard output, as text. ENV adds to this process's environment."""
    out = _run(cmd, stdin.encode() if stdin is not None else None, env, cwd, hint)
    return out.decode(errors="replace")


def run_bytes(cmd: Sequence[str], data: bytes, hint: str = SETUP_HINT) -> bytes:
    """CMD's standard output for DATA on its standard input, as bytes (a compressor's frame)."""
    return _run(cmd, data, None, None, hint)


def _run(
    cmd: Sequence[str], data: bytes | None, env: Mapping[str, str] | None, cwd: Path | None, hint: str
) -> bytes:
    argv = [str(c) for c in cmd]
    log.debug("run: %s", " ".join(argv))
    try:
        p = subprocess.run(
            argv, input=data, capture_output=True, cwd=cwd, env={**os.environ, **env} if env else None
        )
    except FileNotFoundError as e:
        raise SeedError(f"{argv[0]} is not installed", hint) from e
    if p.returncode != 0:
        # the last lines are where tools say what went wrong; the whole command line can be long
        words = (p.stderr or p.stdout).decode(errors="replace").strip().splitlines()[-3:]
        shown = " ".join(argv[:3]) + (" ..." if len(argv) > 3 else "")
        raise SeedError(f"{shown} failed (exit {p.returncode}): {' / '.join(words) or 'no output'}", hint)
    return p.stdout
