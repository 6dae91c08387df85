"""Freshness: the highest versions seen, persisted, and the time to check expiry against.

State file ``STATE_DIR/.trust/state.json`` (the cache partition, ``/knxblock``; the leading
dot keeps it clear of image names in the mirror-shaped cache):

    {"format": 1, "images": {"demo": 7}, "keys": 3}

It is written atomically (temp file, fsync, rename) before the boot goes on, so a replayed
older signed version is refused on every later boot (go-tuf CVE-2022-29173 is what happens
when the highest version is not persisted). An older version is accepted only when the user
asked for it (``seed.version=`` chosen from the GRUB menu): ``allow_older=True``, and the
agent says so on the console. The recorded highest version does not go down then.

Where a TPM is present the image version is also kept in a TPM NV counter (see tpm.py), which
an attacker who rewrites the cache partition cannot wind back.

Early boot has no trustworthy clock (no RTC battery, a fresh VM): expiry is checked with a
bounded tolerance, and the mirror's HTTP ``Date`` header serves as a floor when the local
clock is behind it. The Date header is not authenticated, but it can only move the time
*forward*, which makes expiry stricter, never laxer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from seedboot.agent.atomic import write_atomic
from seedboot.agent.errors import SeedError

log = logging.getLogger(__name__)

STATE_FORMAT = 1
STATE_REL = ".trust/state.json"
DEFAULT_TOLERANCE = 3600
MAX_TOLERANCE = 86400


class RollbackRefused(SeedError):
    """A signed version older than one this machine has already seen."""


@dataclass
class TrustState:
    path: Path | None = None
    images: dict[str, int] = field(default_factory=dict)
    keys: int = 0

    def highest(self, name: str) -> int:
        return self.images.get(name, 0)

    def check_image(self, name: str, version: int, allow_older: bool = False) -> str:
        """Refuse an older version unless asked for; return what was decided (one console line)."""
        high = self.highest(name)
        if version >= high:
            return f"{name} v{version} (highest seen v{high})" if high else f"{name} v{version} (first seen)"
        if not allow_older:
            raise RollbackRefused(
                f"{name} version {version} is older than version {high} seen before on this machine",
                "a mirror may be replaying an old release; to boot it anyway, choose the version "
                "from the boot menu (seed.version=)",
            )
        msg = f"booting older version {version} of {name} as requested (highest seen is {high})"
        log.warning("%s", msg)
        return msg

    def note_image(self, name: str, version: int) -> bool:
        if version > self.highest(name):
            self.images[name] = version
            return True
        return False

    def note_keys(self, version: int) -> bool:
        if version > self.keys:
            self.keys = version
            return True
        return False

    def save(self) -> None:
        if self.path is None:
            return
        data = {"format": STATE_FORMAT, "images": dict(sorted(self.images.items())), "keys": self.keys}
        write_atomic(self.path, (json.dumps(data, indent=1) + "\n").encode())
        log.info("trust state saved to %s: %s", self.path, data)


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_REL


def load_state(state_dir: Path | None) -> TrustState:
    """The state of ``state_dir`` (empty if none yet); ``None`` gives an unsaved, empty state."""
    if state_dir is None:
        return TrustState()
    path = state_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return TrustState(path=path)
    except OSError as e:
        raise SeedError(
            f"cannot read trust state {path}: {e.strerror}", "is the cache partition healthy?"
        ) from e
    try:
        d = json.loads(raw)
        images = d["images"]
        keys = d["keys"]
        ok = (
            d.get("format") == STATE_FORMAT
            and isinstance(images, dict)
            and all(isinstance(k, str) and isinstance(v, int) for k, v in images.items())
            and isinstance(keys, int)
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        # Refusing to boot would let anyone who can scribble on the cache stop the machine;
        # starting over only loses protection that the TPM counter (if any) still gives.
        # (deleting the file has the same effect, so refusing would add no protection).
        log.warning("trust state %s is damaged; starting from an empty state", path)
        return TrustState(path=path)
    return TrustState(path=path, images=dict(images), keys=keys)


@dataclass
class Clock:
    now: float
    source: str  # "local clock" or "mirror Date header"
    tolerance: int

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.now))
        return f"time {when} from the {self.source} (tolerance {self.tolerance} s)"


def local_time() -> float:
    """This machine's clock (one place, so a test can play a machine whose clock is behind)."""
    return time.time()


def choose_time(
    local: float | None = None, server_date: float | None = None, tolerance: int = DEFAULT_TOLERANCE
) -> Clock:
    """The time to check expiry against: the local clock, or the mirror's Date if that is later."""
    if not 0 <= tolerance <= MAX_TOLERANCE:
        raise SeedError(
            f"clock tolerance {tolerance} s is out of range",
            f"use 0 to {MAX_TOLERANCE} s: a larger one would make expiry meaningless",
        )
    local = local_time() if local is None else local
    if server_date is not None and server_date > local + tolerance:
        clock = Clock(server_date, "mirror Date header", tolerance)
        log.info(
            "local clock is %.0f s behind the mirror's Date header; using the mirror's", server_date - local
        )
    else:
        clock = Clock(local, "local clock", tolerance)
    return clock
