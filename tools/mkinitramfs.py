"""Build the seedboot initramfs: busybox, kernel modules, keys, hooks and the frozen agent.

The layout is the contract in initramfs/README.md. The archive is a newc cpio compressed with
zstd (the Debian kernel decompresses it), written by tools/cpio.py so it needs no root.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from seedboot.agent.errors import SeedError
from seedboot.agent.signature import load_public_key
from seedboot.tools import cpio, freeze
from seedboot.tools.command import run, run_bytes
from seedboot.tools.kernel import Kernel, load

log = logging.getLogger(__name__)

REPO = freeze.REPO
HOOKS_SRC = REPO / "hooks"
INITRAMFS_SRC = REPO / "initramfs"
MODULES_LIST = INITRAMFS_SRC / "modules.txt"
RUNTIME = "opt/seedboot"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Files depmod needs besides the modules to rebuild modules.dep/alias for the pruned tree.
MODULE_META = ("modules.builtin", "modules.builtin.modinfo", "modules.order")


@dataclass
class Result:
    path: Path
    size: int
    uncompressed: int
    kernel_version: str
    modules: list[str] = field(default_factory=list)
    runtime_size: int = 0
    seconds: float = 0.0


def norm(name: str) -> str:
    return name.strip().replace("-", "_").removesuffix(".ko")


def read_list(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def module_index(k: Kernel) -> tuple[dict[str, str], dict[str, list[str]], set[str]]:
    """From modules.dep/builtin: name -> relative path, relative path -> its dependencies, built-ins."""
    paths: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in (k.modules / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        paths[norm(Path(mod).name)] = mod
        deps[mod] = rest.split()
    builtin = set()
    bfile = k.modules / "modules.builtin"
    if bfile.exists():
        builtin = {norm(Path(x).name) for x in bfile.read_text().split()}
    return paths, deps, builtin


def resolve_modules(k: Kernel, wanted: Iterable[str]) -> list[str]:
    """Relative paths of WANTED modules and everything they depend on; built-ins are skipped."""
    paths, deps, builtin = module_index(k)
    chosen: dict[str, None] = {}
    unknown = []

    def add(rel: str) -> None:
        if rel in chosen:
            return
        chosen[rel] = None
        for d in deps.get(rel, []):
            add(d)

    for name in wanted:
        n = norm(name)
        if n in paths:
            add(paths[n])
        elif n in builtin:
            log.info("module %s is built into %s", name, k.version)
        else:
            unknown.append(name)
    if unknown:
        raise SeedError(
            f"kernel {k.version} has no module {', '.join(unknown)}",
            hint=f"fix {MODULES_LIST.name} or --extra-module (names as in modules.dep)",
        )
    return sorted(chosen)


def stage_modules(k: Kernel, rels: list[str], root: Path) -> None:
    """Copy the chosen modules into ROOT/lib/modules/VERSION and depmod them there."""
    dest = root / "lib" / "modules" / k.version
    if root.exists():
        shutil.rmtree(root)
    dest.mkdir(parents=True)
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(k.modules / rel, dest / rel)
    for meta in MODULE_META:
        if (k.modules / meta).exists():
            shutil.copy2(k.modules / meta, dest / meta)
    run(["depmod", "-b", str(root), k.version])
    # depmod's binary indexes duplicate the text files busybox modprobe reads; the whole kernel's
    # module order and built-in modinfo were only depmod's input (35 KB zstd).
    for p in [*dest.glob("*.bin"), dest / "modules.order", dest / "modules.builtin.modinfo"]:
        p.unlink(missing_ok=True)


def busybox_entries() -> Iterator[cpio.Entry]:
    path = shutil.which("busybox")
    if path is None:
        raise SeedError("busybox not found", hint="apt-get install busybox-static")
    data = Path(path).read_bytes()
    if b"/lib64/ld-linux" in data[:4096]:
        raise SeedError(f"{path} is not static", hint="apt-get install busybox-static")
    yield cpio.file("bin/busybox", data, 0o755)
    applets = run([path, "--list-full"])
    for applet in applets.split():
        # One flat layout: every applet in /bin or /sbin, nothing under /usr.
        top = "sbin" if "sbin/" in applet else "bin"
        name = Path(applet).name
        if name != "busybox":
            yield cpio.symlink(f"{top}/{name}", "/bin/busybox")


def key_entries(pubkeys: list[Path]) -> Iterator[cpio.Entry]:
    if not pubkeys:
        raise SeedError("no --pubkey given", hint="the agent trusts only the keys built into the initramfs")
    seen: dict[str, Path] = {}
    for p in pubkeys:
        load_public_key(p)  # a clear error now rather than at boot
        if p.name in seen:
            raise SeedError(f"two keys named {p.name}: {seen[p.name]} and {p}", hint="rename one")
        seen[p.name] = p
        yield cpio.file(f"etc/seedboot/keys/{p.name}", p.read_bytes())


def hook_entries(hooks: Path) -> Iterator[cpio.Entry]:
    yield cpio.directory("etc/seedboot/hooks")
    if not hooks.is_dir():
        return
    for d in sorted(hooks.glob("*.d")):
        if d.is_dir():
            yield from cpio.tree(d, f"etc/seedboot/hooks/{d.name}")


def source_hash(paths: Iterable[Path]) -> str:
    """SHA-256 over the names and contents of every file under PATHS (caches and initrd-release)."""
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            if "__pycache__" in p.parts:
                continue
            h.update(str(p.relative_to(root.parent)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def release(k: Kernel, build: str) -> bytes:
    try:
        version = importlib.metadata.version("seedboot")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return (
        'NAME="seedboot"\nID=seedboot\n'
        f'VERSION_ID="{version}"\nPRETTY_NAME="seedboot initramfs {version}"\n'
        f"SEEDBOOT_KERNEL={k.version}\nSEEDBOOT_BUILD={build[:16]}\n"
    ).encode()


def base_entries() -> Iterator[cpio.Entry]:
    for d in ("dev", "proc", "sys", "run", "tmp", "etc", "lib", "root", "mnt", "newroot", "knxblock"):
        yield cpio.directory(d, 0o1777 if d == "tmp" else 0o755)
    yield cpio.symlink("usr/bin", "../bin")
    yield cpio.symlink("usr/sbin", "../sbin")
    # The kernel opens /dev/console for init's stdio before anything could mount devtmpfs.
    yield cpio.chardev("dev/console", 5, 1)
    yield cpio.chardev("dev/null", 1, 3, 0o666)
    yield cpio.file("init", (INITRAMFS_SRC / "files" / "init.sh").read_bytes(), 0o755)


def frozen_runtime(agent_src: Path, work: Path, cache: Path | None) -> freeze.Runtime:
    if cache is None:
        return freeze.freeze(work / "runtime", agent_src)
    inputs = [agent_src, INITRAMFS_SRC / "files", *(REPO / "tools" / n for n in ("freeze.py", "stublib.py"))]
    dists = sorted(f"{d.metadata['Name']}={d.version}" for d in importlib.metadata.distributions())
    key = hashlib.sha256(f"{source_hash(inputs)} {sys.version} {dists}".encode()).hexdigest()[:16]
    done = cache / key
    if not done.is_dir():
        tmp = freeze.freeze(cache / f".{key}.{os.getpid()}.tmp", agent_src)
        try:
            tmp.root.replace(done)
        except OSError:  # another build froze the same sources first
            shutil.rmtree(tmp.root)
        # Every agent edit freezes a new runtime (~40 MB): keep the newest few.
        for old in sorted(cache.iterdir(), key=lambda p: p.stat().st_mtime)[:-4]:
            if not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    log.info("frozen runtime from cache %s", done)
    return freeze.Runtime(done)


def assemble(
    k: Kernel,
    keys: list[cpio.Entry],
    work: Path,
    hooks: Path,
    agent_src: Path,
    extra_modules: Iterable[str],
    level: int,
    runtime_cache: Path | None,
    pubkeys: list[Path],
) -> tuple[bytes, int, list[str], int]:
    """The compressed image, its unpacked size, the module paths and the runtime's size."""
    wanted = [*read_list(MODULES_LIST), *extra_modules]
    rels = resolve_modules(k, wanted)
    log.info("%d modules (%d asked for) from %s", len(rels), len(wanted), k.version)
    stage_modules(k, rels, work / "modules")

    print("freezing the agent ...", flush=True)
    rt = frozen_runtime(agent_src, work, runtime_cache)
    runtime_size = freeze.size_of(rt.root)

    build_id = source_hash([agent_src, hooks, INITRAMFS_SRC, *pubkeys])
    entries: list[cpio.Entry] = [
        *base_entries(),
        *busybox_entries(),
        *cpio.tree(work / "modules" / "lib" / "modules", "lib/modules"),
        cpio.directory("opt"),
        *cpio.tree(rt.root, RUNTIME),
        cpio.directory("etc/seedboot"),
        cpio.directory("etc/seedboot/keys"),
        *keys,
        *hook_entries(hooks),
        cpio.file("etc/initrd-release", release(k, build_id)),
    ]
    if CA_BUNDLE.is_file():
        entries += [cpio.directory("etc/ssl"), cpio.directory("etc/ssl/certs")]
        entries.append(cpio.file("etc/ssl/certs/ca-certificates.crt", CA_BUNDLE.read_bytes()))
    raw = io.BytesIO()
    uncompressed = cpio.write(raw, entries)
    print(f"compressing {uncompressed / 1e6:.1f} MB with zstd -{level} ...", flush=True)
    data = compress(raw.getvalue(), level)
    return data, uncompressed, rels, runtime_size


WINDOW_LOG = 24


def compress(archive: bytes, level: int) -> bytes:
    """The cpio as the kernel's zstd decoder takes it: one frame with a content checksum.

    A 16 MB window with long-distance matching finds the repeats across the ~40 MB archive
    (ELF files share code and tables): -0.36 MB at -19. The kernel allocates the frame's window
    to unpack it (16 MB instead of 8 MB, freed before /init runs). Literals are stored raw, not
    Huffman-coded: under QEMU -icount the kernel unpacked the archive in 2.44 s of guest time
    instead of 2.59 s and ran /init 0.16 s sooner (2 boots each, the same to 2 ms), for 0.18 MB
    more (10.55 MB). That needs the zstd program: python-zstandard has no setting for it."""
    options = [f"--long={WINDOW_LOG}", "--no-compress-literals", "--check", "-T0", "-q", "-c"]
    return run_bytes(["zstd", f"-{level}", *options], archive, hint="apt-get install zstd")


def build(
    kernel_dir: Path,
    pubkeys: list[Path],
    out: Path,
    *,
    hooks: Path = HOOKS_SRC,
    agent_src: Path = freeze.AGENT_SRC,
    extra_modules: Iterable[str] = (),
    level: int = 19,
    runtime_cache: Path | None = None,
) -> Result:
    """Write the initramfs to OUT. RUNTIME_CACHE: a directory where frozen runtimes are kept by a hash
    of what goes into them (tests build several images from the same agent)."""
    t0 = time.monotonic()
    if not 1 <= level <= 19:
        raise SeedError(f"zstd level {level} is out of range", hint="use 1 (fast) to 19 (small, the default)")
    k = load(kernel_dir)
    keys = list(key_entries(pubkeys))
    work = out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        image, uncompressed, rels, runtime_size = assemble(
            k, keys, work, hooks, agent_src, extra_modules, level, runtime_cache, pubkeys
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(image)
    tmp.replace(out)
    return Result(
        path=out,
        size=len(image),
        uncompressed=uncompressed,
        kernel_version=k.version,
        modules=[Path(r).name for r in rels],
        runtime_size=runtime_size,
        seconds=time.monotonic() - t0,
    )
