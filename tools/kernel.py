"""Fetch Debian's kernel package and lay it out for the initramfs and seed disk builders.

The result in DIR: ``vmlinuz``, ``config``, ``kernel-version`` and ``lib/modules/VERSION`` with a
``modules.dep`` (Debian ships none, so ``depmod -b`` makes it).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from seedboot.agent.errors import SeedError
from seedboot.tools.command import run

log = logging.getLogger(__name__)

META_PACKAGE = "linux-image-amd64"


@dataclass(frozen=True)
class Kernel:
    root: Path
    version: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def load(root: Path) -> Kernel:
    """The kernel laid out by fetch() in ROOT, or a SeedError saying what is missing."""
    vfile = root / "kernel-version"
    if not vfile.is_file():
        raise SeedError(f"{root} holds no fetched kernel", hint=f"run: seedboot kernel fetch --out {root}")
    k = Kernel(root, vfile.read_text().strip())
    for need in (k.vmlinuz, k.modules / "modules.dep"):
        if not need.exists():
            raise SeedError(f"{need} is missing", hint=f"run: seedboot kernel fetch --out {root} --force")
    return k


def resolve_package(meta: str = META_PACKAGE) -> str:
    """The versioned image package the meta package depends on (linux-image-6.1.0-N-amd64)."""
    out = run(["apt-cache", "depends", meta])
    found = re.findall(r"Depends:\s*(linux-image-\S+)", out)
    if not found:
        raise SeedError(f"apt-cache knows no kernel behind {meta}", hint="run apt-get update")
    return str(found[0])


def fetch(out: Path, force: bool = False, meta: str = META_PACKAGE) -> Kernel:
    """Download, extract and depmod the kernel into OUT; a complete OUT is kept as is."""
    if not force:
        try:
            k = load(out)
            log.info("kernel %s already in %s", k.version, out)
            return k
        except SeedError:
            pass
    package = resolve_package(meta)
    log.info("kernel package %s", package)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".fetch-") as tmp_s:
        tmp = Path(tmp_s)
        run(["apt-get", "download", "-q", package], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise SeedError(f"apt-get download {package} left no .deb")
        tree = tmp / "tree"
        run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise SeedError(f"{debs[0].name} holds no /boot/vmlinuz-*")
        version = vmlinuz[0].name.removeprefix("vmlinuz-")
        mods = tree / "lib" / "modules" / version
        if not mods.is_dir():
            raise SeedError(f"{debs[0].name} holds no /lib/modules/{version}")
        run(["depmod", "-b", str(tree), version])
        for name in ("vmlinuz", "config", "kernel-version", "lib"):
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        shutil.move(str(vmlinuz[0]), out / "vmlinuz")
        cfg = tree / "boot" / f"config-{version}"
        if cfg.exists():
            shutil.move(str(cfg), out / "config")
        shutil.move(str(tree / "lib"), out / "lib")
        # Written last: its presence marks a complete fetch.
        (out / "kernel-version").write_text(version + "\n")
    log.info("kernel %s in %s", version, out)
    return load(out)
