"""Boot artifacts built once and shared by every test (and every pytest worker) under build/test-artifacts.

- ``kernel_dir()``: Debian's kernel with modules (seedboot kernel fetch).
- ``initramfs(pubkeys)``: the initramfs trusting PUBKEYS; cached by a hash of the agent, hooks,
  initramfs sources, the build code and the keys, so an edit to the agent rebuilds it.
- ``demo_root(size_mb, data_mb)``: the demo root image.
- ``signing_keypair(name)``: a signing key pair kept with the artifacts (so initramfs caches hit).

A file lock serialises builders, so parallel test processes build each artifact once.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from seedboot.tools import demoroot, freeze, kernel, keys, mkinitramfs

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "build" / "test-artifacts"
RUNTIME_CACHE = ARTIFACTS / "runtime"
BUILD_CODE = [REPO / "tools" / n for n in ("freeze.py", "mkinitramfs.py", "cpio.py")]


@contextmanager
def locked(name: str) -> Iterator[None]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with (ARTIFACTS / f".{name}.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def kernel_dir() -> Path:
    out = ARTIFACTS / "kernel"
    with locked("kernel"):
        kernel.fetch(out)
    return out


def signing_keypair(name: str = "test") -> tuple[Path, Path]:
    """(secret key, public key) under build/test-artifacts/keys, made once."""
    d = ARTIFACTS / "keys"
    key, pub = d / f"{name}.key", d / f"{name}.pub"
    with locked("keys"):
        if not (key.exists() and pub.exists()):
            keys.write_keypair(d / name, force=True)
    return key, pub


def initramfs_key(pubkeys: list[Path], level: int) -> str:
    h = hashlib.sha256()
    h.update(mkinitramfs.source_hash([freeze.AGENT_SRC, mkinitramfs.HOOKS_SRC]).encode())
    h.update(mkinitramfs.source_hash([mkinitramfs.INITRAMFS_SRC, *BUILD_CODE]).encode())
    for p in pubkeys:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(f"level={level}".encode())
    return h.hexdigest()[:16]


def initramfs(pubkeys: list[Path], level: int = 19) -> Path:
    """The initramfs trusting PUBKEYS, built with the current sources (cached)."""
    k = kernel_dir()
    key = initramfs_key(pubkeys, level)
    out = ARTIFACTS / f"initramfs-{key}.img"
    with locked("initramfs"):
        if not out.exists():
            mkinitramfs.build(k, pubkeys, out, level=level, runtime_cache=RUNTIME_CACHE)
            # Every agent edit makes a new image: keep the build directory from filling up.
            for old in sorted(ARTIFACTS.glob("initramfs-*.img"), key=lambda p: p.stat().st_mtime)[:-8]:
                old.unlink(missing_ok=True)
            # Work directories of builds that were killed (an interrupted test run) an hour ago or more.
            for stale in ARTIFACTS.glob(".initramfs-*.img.work"):
                if time.time() - stale.stat().st_mtime > 3600:
                    shutil.rmtree(stale, ignore_errors=True)
    return out


def demo_root(size_mb: int = 128, data_mb: int = 64) -> Path:
    code = hashlib.sha256((REPO / "tools" / "demoroot.py").read_bytes()).hexdigest()[:8]
    out = ARTIFACTS / f"demo-root-{size_mb}m-{data_mb}m-{code}.img"
    with locked("demo-root"):
        if not out.exists():
            demoroot.build(out, size_mb=size_mb, data_mb=data_mb)
    return out
