"""Freeze the agent into a self-contained runtime directory (seedboot's own minimal freezer).

Layout (initramfs/README.md): ``seedboot-agent`` (a small C launcher embedding CPython),
``lib/`` (every shared library the launcher and the extension modules need, with the loader),
``python/`` (sourceless optimize=2 .pyc and stripped extension modules: the agent, its
third-party packages, and the stdlib modules they import, found with modulefinder).

Why not PyInstaller: its bootloader unpacks/probes at start, and it imports more than the agent
needs; under emulation each import and file probe costs ~10x, so a plain directory with only
what is imported starts fastest. The build uses the interpreter this process runs on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import modulefinder
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from seedboot.agent.cmdline import STAGE_NAMES
from seedboot.agent.errors import SeedError
from seedboot.agent.main import DAEMON_MODULES
from seedboot.tools import stublib
from seedboot.tools.command import run

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
AGENT_SRC = REPO / "agent"
FILES = REPO / "initramfs" / "files"
RUN_HOME = "/run/seedboot"
LOADER = f"{RUN_HOME}/lib/ld-linux-x86-64.so.2"

# Third-party packages frozen whole (their lazy imports would escape modulefinder).
# trio (and attrs, outcome, sniffio, sortedcontainers) stay out: pyfuse3 runs on asyncio and an
# empty module stands in for the trio it imports (seedboot.agent.pyfuse).
PACKAGES: tuple[str, ...] = (
    "pyfuse3",
    "pycurl",
    "pyudev",
    "netifaces",
    "zstandard",
)
# Files never needed at run time (type stubs, tests, the cffi backend of zstandard).
SKIP_PARTS = frozenset({"__pycache__", "tests", "_tests", "testing", "test", "_tools"})
SKIP_SUFFIXES = (".pyi", ".typed", ".c", ".h", ".pyx", ".pxd", ".md", ".txt")
SKIP_NAMES = re.compile(r"^(_cffi\..*\.so|backend_cffi\.py|_windows.*\.py)$")


def _lazy(module: str) -> str:
    """Source standing in for ``import MODULE``: a proxy that imports it on first use (PATCHES)."""
    return (
        "class _SeedbootLazy:  # seedboot freezer: imports the module on first use (see PATCHES)\n"
        "    def __getattr__(self, name):\n"
        "        import importlib\n"
        f"        return getattr(importlib.import_module({module!r}), name)\n"
        f"{module} = _SeedbootLazy()\n"
    )


# Source edits at freeze time: module path -> ((old, new), ...), for start-up cost under emulation.
# - pyfuse3 asks importlib.metadata for its version at import, which pulls in email, zipfile, csv...
# - dataclasses imports inspect (ast, dis, tokenize, linecache: ~40% of dataclasses' import time
#   under TCG) only to fabricate a __doc__ for classes without one, which with optimize=2 means every
#   dataclass, each paying an inspect.signature(): classes keep __doc__ None instead.
# (The asyncio, stdlib and zstandard ones say why beside them.)
PATCHES: dict[str, tuple[tuple[str, str], ...]] = {
    "pyfuse3/_pyfuse3.py": (
        (
            "from importlib.metadata import PackageNotFoundError, version as package_version\n",
            "class PackageNotFoundError(Exception): pass\ndef package_version(name): return {version!r}\n",
        ),
    ),
    # random seeds every Random() (its module-level instance at import: tempfile, trio) from
    # /dev/urandom, which at early boot on a CPU without RDRAND waits for the kernel's CRNG (see
    # the launcher's hash seed): the non-cryptographic generator takes what the CRNG has now.
    "random.py": (
        (
            "import _random\n",
            "import _random\n"
            "def _seedboot_seed():  # seedboot freezer: see PATCHES\n"
            "    try:\n"
            "        return int.from_bytes(_os.getrandom(32, 0x0004), 'big')  # GRND_INSECURE\n"
            "    except (OSError, AttributeError):\n"
            "        return None\n",
        ),
        (
            "        super().seed(a)\n        self.gauss_next = None\n",
            "        if a is None:\n            a = _seedboot_seed()\n"
            "        super().seed(a)\n        self.gauss_next = None\n",
        ),
    ),
    "dataclasses.py": (
        ("\nimport inspect\n", "\n"),
        ("    if not getattr(cls, '__doc__'):\n", "    if False:  # seedboot freezer: see PATCHES\n"),
    ),
    # asyncio imports inspect (and with it ast, dis, opcode, tokenize...: ~40% of asyncio's
    # import time under qemu-user, in the block daemon's start) for three rare paths and one
    # common one: add_signal_handler's coroutine check, here done as inspect does it in 3.11
    # (a function, method or partial whose code has CO_COROUTINE); the rare ones (a callback's
    # repr in an error message, a task yielding a bare generator, ensure_future on an awaitable
    # that is not a coroutine) import inspect when they happen.
    "asyncio/coroutines.py": (
        ("\nimport inspect\n", "\nimport functools\n"),
        (
            "    return (inspect.iscoroutinefunction(func) or\n",
            "    f = func  # seedboot freezer: inspect.iscoroutinefunction without inspect (see PATCHES)\n"
            "    while isinstance(f, types.MethodType):\n"
            "        f = f.__func__\n"
            "    while isinstance(f, functools.partial):\n"
            "        f = f.func\n"
            "    code = getattr(f, '__code__', None)\n"
            "    return (isinstance(code, types.CodeType) and bool(code.co_flags & 0x80) or\n",
        ),
    ),
    "asyncio/format_helpers.py": (("\nimport inspect\n", "\n" + _lazy("inspect")),),
    "asyncio/tasks.py": (("\nimport inspect\n", "\n" + _lazy("inspect")),),
    # Imported at start (PID 1's guest time, in ms under emulation) for functions that run
    # rarely or never in the agent: tokenize (20) reads a source file for a traceback line,
    # textwrap (11) indents exception notes, ipaddress (17) checks a bracketed URL host.
    "linecache.py": (("\nimport tokenize\n", "\n" + _lazy("tokenize")),),
    "traceback.py": (("\nimport textwrap\n", "\n" + _lazy("textwrap")),),
    "urllib/parse.py": (("\nimport ipaddress\n", "\n" + _lazy("ipaddress")),),
    # zstandard asks platform (17 ms) only which Python this is.
    "zstandard/__init__.py": (
        ("\nimport platform\n", "\n"),
        ('platform.python_implementation() in ("CPython",)', 'sys.implementation.name == "cpython"'),
        ('platform.python_implementation() in ("PyPy",)', 'sys.implementation.name == "pypy"'),
    ),
}
# Packages whose __init__ is an extension module: modulefinder cannot scan them (and loops on them);
# the stdlib modules they import are in STDLIB_ALWAYS.
NOT_SCANNED = ("pyfuse3",)
# Stdlib trees the agent never uses, even if some module mentions them.
STDLIB_EXCLUDES = (
    "tkinter",
    "idlelib",
    "test",
    "lib2to3",
    "ensurepip",
    "pydoc",
    "pydoc_data",
    "distutils",
    "turtle",
    "turtledemo",
    "unittest",
    "doctest",
    "pdb",
    "bdb",
    "code",
    "codeop",
    "readline",
    "rlcompleter",
    "difflib",
    "plistlib",
    "_osx_support",
    "_aix_support",
    "setuptools",
    "pip",
    "curses",
    "dbm",
    "sqlite3",
    "xmlrpc",
    "multiprocessing",
    "lzma",
    "_lzma",
    "bz2",
    "_bz2",
    "_pydecimal",
    # Reached only from random's self-test (statistics) and what statistics imports: 0.13 MB zstd.
    "statistics",
    "fractions",
    "decimal",
    "_decimal",
    "ssl",
    "_ssl",
    # Only in lazy imports the agent never takes (time.strptime, pickle's and uuid's
    # self-tests), or in nothing the agent loads (sysconfig, pkgutil, zipimport is frozen in).
    "_strptime",
    "calendar",
    "pprint",
    "uuid",
    "_uuid",
    "sysconfig",
    "pkgutil",
    "zipimport",
    # Reached only through lazy imports the agent never takes (HTTP and mail parsing in
    # urllib.request and importlib.metadata, \\N{...} in regexes, attrs' make_class with a
    # non-ASCII name, non-ASCII host names): 2.3 MB, 1.1 MB of it unicodedata. (asyncio stays:
    # the block daemon runs pyfuse3 on it.)
    "email",
    "http",
    "urllib.request",
    "importlib.metadata",
    "html",
    "xml",
    "pyexpat",
    "unicodedata",
    "stringprep",
    "encodings.idna",
    # Likewise (shutil's archives, base64's and pickle's command lines, warnings' tracebacks).
    "tarfile",
    "zipfile",
    "gzip",
    "fileinput",
    "configparser",
    "optparse",
    "getopt",
    "getpass",
    "tracemalloc",
    "py_compile",
    "imp",
    "zoneinfo",
    "tomllib",
)
# Loaded by the interpreter itself (not by import statements modulefinder sees).
STDLIB_ALWAYS = (
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.raw_unicode_escape",
    "encodings.unicode_escape",
    # imported by pyfuse3's extension module
    "pickle",
    "queue",
    "threading",
    "logging",
    "typing",
)


@dataclass
class Runtime:
    root: Path
    modules: list[str] = field(default_factory=list)
    libraries: list[str] = field(default_factory=list)

    @property
    def launcher(self) -> Path:
        return self.root / "seedboot-agent"


def compile_launcher(out: Path) -> None:
    include = sysconfig.get_path("include")
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") and not Path(libdir, "libpython3.11.so").exists():
        raise SeedError("this Python has no shared libpython", hint="install python3-dev (libpython3.11)")
    log.info("launcher: gcc against %s/%s", libdir, ldlib)
    run(
        [
            "gcc",
            "-O2",
            "-s",
            "-o",
            str(out),
            str(FILES / "launcher.c"),
            f"-I{include}",
            f"-L{libdir}",
            f"-lpython{sysconfig.get_python_version()}",
            # DT_RPATH (not RUNPATH): it also applies to libraries that dlopen'ed extension modules need.
            "-Wl,--disable-new-dtags,-rpath,$ORIGIN/lib",
            # The runtime's own loader: it must match the runtime's libc, whatever root is mounted.
            f"-Wl,--dynamic-linker={LOADER}",
        ]
    )


def compile_py(src: Path, dest: Path, name: str, extra: str = "") -> None:
    """SRC as a sourceless .pyc at DEST (tracebacks name the module, not a build path)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    patch = PATCHES.get(name, ())
    if extra or patch:
        text = src.read_text() + "\n" + extra
        for old, new in patch:
            if old not in text:
                raise SeedError(f"{name} changed: cannot apply the freezer's patch", hint="update PATCHES")
            if "{version" in new:
                new = new.format(version=importlib.metadata.version(name.split("/")[0]))
            text = text.replace(old, new, 1)
        tmp = dest.with_suffix(".src.py")
        tmp.write_text(text)
        src = tmp
    py_compile.compile(
        str(src), cfile=str(dest), dfile=name, doraise=True, optimize=2,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )  # fmt: skip
    if extra or patch:
        src.unlink()


def package_files(pkg_dir: Path) -> Iterator[Path]:
    for p in sorted(pkg_dir.rglob("*")):
        rel = p.relative_to(pkg_dir)
        if not p.is_file() or SKIP_PARTS.intersection(rel.parts[:-1]):
            continue
        if p.name.endswith(SKIP_SUFFIXES) or SKIP_NAMES.match(p.name):
            continue
        yield p


def add_tree(src_root: Path, files: Iterable[Path], dest_root: Path, prefix: str) -> list[Path]:
    """Copy FILES (under SRC_ROOT) into DEST_ROOT/PREFIX, .py compiled; returns the .py sources."""
    sources = []
    for f in files:
        rel = f.relative_to(src_root)
        dest = dest_root / prefix / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".py":
            name = f"{prefix}/{rel}".lstrip("/")
            compile_py(f, dest.with_suffix(".pyc"), name)
            sources.append(f)
        elif f.suffix == ".so":
            shutil.copy2(f, dest)
        # Data files (certificates, ...) are copied too: packages open them relative to __file__.
        else:
            shutil.copy2(f, dest)
    return sources


def third_party(py: Path) -> list[str]:
    """Copy the PACKAGES into PY; returns their module names."""
    names: list[str] = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise SeedError(f"python package {name} is not installed", hint="run scripts/setup")
        origin = Path(spec.origin)
        if spec.submodule_search_locations:
            pkg = origin.parent
            names += module_names(pkg.parent, add_tree(pkg.parent, package_files(pkg), py, ""), "")
        else:
            names += module_names(origin.parent, add_tree(origin.parent, [origin], py, ""), "")
    return names


def agent(py: Path, agent_src: Path) -> tuple[list[str], list[Path]]:
    """Copy the agent into PY; returns its module names and the scripts modulefinder must scan."""
    py.joinpath("seedboot").mkdir(parents=True, exist_ok=True)
    init = py / "seedboot" / "__init__.pyc"
    empty = py / "seedboot" / "__init__.py"
    empty.write_text('"""seedboot (frozen): only the agent is here."""\n')
    compile_py(empty, init, "seedboot/__init__.py")
    empty.unlink()
    files = [f for f in package_files(agent_src) if f.suffix == ".py"]
    names = module_names(agent_src, add_tree(agent_src, files, py, "seedboot/agent"), "seedboot.agent")
    scripts = []
    if not (agent_src / "main.py").exists():
        log.warning("agent/main.py does not exist yet: freezing the placeholder entry point")
        placeholder = FILES / "placeholder_main.py"
        compile_py(placeholder, py / "seedboot" / "agent" / "main.pyc", "seedboot/agent/main.py")
        scripts.append(placeholder)
    return names, scripts


def module_names(root: Path, files: Iterable[Path], prefix: str) -> list[str]:
    names = []
    for f in files:
        parts = [*prefix.split(".")] if prefix else []
        parts += f.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def stdlib_modules(
    names: list[str], scripts: list[Path], agent_src: Path, work: Path
) -> dict[str, str | None]:
    """Stdlib module name -> file (None for built-ins) that NAMES and SCRIPTS import, transitively."""
    stdlib = sysconfig.get_path("stdlib")
    dynload = os.path.join(stdlib, "lib-dynload")
    # seedboot.agent is mapped by the editable install; modulefinder needs a plain tree.
    shim = work / "seedboot"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text("")
    link = shim / "agent"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(agent_src.resolve())
    site = [p for p in sys.path if p.endswith("site-packages")]
    # modulefinder recurses once per nested import; cryptography's chains exceed the default limit.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    mf = modulefinder.ModuleFinder(
        path=[str(work), *site, stdlib, dynload], excludes=[*STDLIB_EXCLUDES, *NOT_SCANNED]
    )
    for name in [*names, *STDLIB_ALWAYS]:
        if name.split(".")[0] in NOT_SCANNED:
            continue
        try:
            mf.import_hook(name)
        except ImportError as e:
            log.debug("modulefinder: %s: %s", name, e)
    for s in scripts:
        mf.run_script(str(s))
    found: dict[str, str | None] = {}
    for name, mod in mf.modules.items():
        file: str | None = getattr(mod, "__file__", None)
        if name != "__main__" and (file is None or file.startswith(stdlib + os.sep)):
            found[name] = file
    return found


def add_stdlib(py: Path, modules: dict[str, str | None]) -> None:
    stdlib = Path(sysconfig.get_path("stdlib"))
    tail = (FILES / "ctypes_util_tail.py").read_text()
    for name, file in sorted(modules.items()):
        if file is None:
            continue
        src = Path(file)
        if src.suffix == ".so":
            shutil.copy2(src, py / src.name)
            continue
        rel = src.relative_to(stdlib)
        compile_py(src, (py / rel).with_suffix(".pyc"), str(rel), extra=tail if name == "ctypes.util" else "")


# More of libcurl's features the agent never asks for (tools/stublib.py says how a stub works):
# Content-Encoding zstd and br (the agent sets no CURLOPT_ACCEPT_ENCODING: blocks are fetched as
# stored), and scp:/sftp: (libssh2_init() == 0 is success; libssh2_version() is for the version
# string). libzstd is not the zstandard module's: that one is built in. 1.2 MB raw, ~0.5 MB zstd.
MORE_STUBS = (
    stublib.Stub("libzstd.so.1", "0"),
    stublib.Stub("libbrotlidec.so.1", "0"),
    stublib.Stub("libssh2.so.1", "0", ("libssh2_version",)),
    # Debian builds pyexpat into libpython; the xml packages that use it are excluded above.
    stublib.Stub("libexpat.so.1", "0"),
)
# What the code cache is recorded from (agent/codecache.py): what PID 1 and the block daemon import.
RECORD_IMPORTS = (
    "seedboot.agent.main",
    "seedboot.agent.stages.runner",
    *(f"seedboot.agent.stages.{s}" for s in STAGE_NAMES),
    *DAEMON_MODULES,
)
RECORDER = """
import sys
sys.path[:] = [sys.argv[1]]
from seedboot.agent import codecache
codecache.record()
import seedboot.agent
# The listed modules first (their order is the boot's), then every agent module a stage imports lazily.
names = [*sys.argv[3:], *codecache.agent_modules(seedboot.agent.__path__[0])]
for name in names:
    try:
        __import__(name)
    except Exception as e:
        print(f"codecache: {name}: {type(e).__name__}: {e}", file=sys.stderr)
print(codecache.save(sys.argv[2]))
"""


def record_code_cache(py: Path) -> int:
    """Compile, on this host, the source the agent's imports generate (agent/codecache.py)."""
    if not (py / "seedboot" / "agent" / "codecache.pyc").exists():
        return 0
    out = py / "seedboot" / "codecache.marshal"
    # -OO: the runtime's optimization level; -I -S: nothing from this venv but the frozen tree.
    text = run([sys.executable, "-OO", "-I", "-S", "-c", RECORDER, str(py), str(out), *RECORD_IMPORTS])
    return int(text.split()[-1])


def elf_files(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with p.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    out.append(p)
    return out


LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)$|^\s*(/\S+)\s+\(0x[0-9a-f]+\)$")


def shared_libraries(elves: list[Path], extra: Iterable[str]) -> dict[str, Path]:
    """soname -> host path for every library ELVES need (plus EXTRA sonames), the loader included."""
    libs: dict[str, Path] = {}
    for name in extra:
        path = find_host_library(name)
        libs[name] = path
        elves = [*elves, path]
    for e in elves:
        out = subprocess.run(["ldd", str(e)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if "not found" in line:
                soname = line.split()[0]
                if soname.startswith("libpython"):
                    continue
                raise SeedError(f"{e.name} needs {soname}, which is not installed", hint="run scripts/setup")
            m = LDD_LINE.match(line)
            if not m:
                continue
            if m.group(3):
                loader = Path(m.group(3))
                if str(loader) == LOADER:  # the launcher names the runtime's future copy
                    loader = Path("/lib64") / loader.name
                libs[loader.name] = loader
            elif not m.group(1).startswith("libpython"):
                # "/run/seedboot/lib/ld-linux-x86-64.so.2 => /lib64/..." names the loader by path.
                libs[Path(m.group(1)).name] = Path(m.group(2))
    return libs


def find_host_library(soname: str) -> Path:
    out = run(["ldconfig", "-p"])
    for line in out.splitlines():
        parts = line.strip().split(" => ")
        if len(parts) == 2 and parts[0].split()[0] == soname and "x86-64" in parts[0]:
            return Path(parts[1])
    raise SeedError(f"library {soname} is not installed", hint="run scripts/setup")


def strip(files: Iterable[Path]) -> None:
    paths = [str(f) for f in files]
    if paths:
        # Debug info is most of libpython, cryptography's and zstandard's size.
        run(["strip", "--strip-unneeded", *paths])


def prune_libraries(root: Path, keep: list[str]) -> None:
    """Delete libraries in ROOT/lib that nothing needs any more (the stubs cut off whole trees)."""
    lib = root / "lib"
    todo = [e for e in elf_files(root) if e.parent != lib] + [lib / k for k in keep]
    reached: set[str] = set()
    while todo:
        e = todo.pop()
        for name in stublib.needed(e):
            if name not in reached and (lib / name).exists():
                reached.add(name)
                todo.append(lib / name)
    for p in sorted(lib.iterdir()):
        if p.name not in reached and p.name not in keep:
            log.info("dropping %s: nothing needs it", p.name)
            p.unlink()


def drop_search_paths(path: Path) -> bool:
    """Remove DT_RUNPATH/DT_RPATH from an ELF64 file's dynamic section; True if one was there.

    A build interpreter's RUNPATH (pyenv's lib dir, say) would make the loader ignore the launcher's
    RPATH for that object's dependencies, so libm & co would not be found in the guest.
    """
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        ph = phoff + i * phentsize
        if int.from_bytes(data[ph : ph + 4], "little") != 2:  # PT_DYNAMIC
            continue
        off = int.from_bytes(data[ph + 8 : ph + 16], "little")
        size = int.from_bytes(data[ph + 32 : ph + 40], "little")
        entries = [bytes(data[off + j : off + j + 16]) for j in range(0, size, 16)]
        kept = [e for e in entries if int.from_bytes(e[:8], "little") not in (15, 29)]
        if len(kept) == len(entries):
            return False
        kept += [bytes(16)] * (len(entries) - len(kept))  # DT_NULL padding keeps the section size
        data[off : off + size] = b"".join(kept)
        path.write_bytes(bytes(data))
        return True
    return False


def freeze(out: Path, agent_src: Path = AGENT_SRC) -> Runtime:
    """Build the runtime into OUT (emptied first)."""
    if out.exists():
        shutil.rmtree(out)
    py = out / "python"
    lib = out / "lib"
    py.mkdir(parents=True)
    lib.mkdir()
    rt = Runtime(out)
    compile_launcher(rt.launcher)
    names, scripts = agent(py, agent_src)
    names += third_party(py)
    std = stdlib_modules(names, scripts, agent_src, out.parent / f".{out.name}-mf")
    shutil.rmtree(out.parent / f".{out.name}-mf")
    add_stdlib(py, std)
    rt.modules = sorted(std)
    log.info("frozen %d agent/third-party modules, %d stdlib modules", len(names), len(std))
    log.info("code cache: %d compiled snippets", record_code_cache(py))

    libpython = Path(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME") or "")
    if not libpython.is_file():
        raise SeedError(f"{libpython} not found", hint="install python3-dev (libpython3.11)")
    shutil.copy2(libpython, lib / libpython.name)
    elves = elf_files(out)
    # libudev is opened by pyudev through ctypes, so no ELF names it.
    libs = shared_libraries(elves, extra=["libudev.so.1"])
    for soname, path in sorted(libs.items()):
        shutil.copy2(path, lib / soname)
    stubs = (*stublib.STUBS, *MORE_STUBS)
    stub_names = {st.soname for st in stubs}
    for st in stubs:
        if st.soname in libs:
            consumers = [
                e for e in elf_files(out) if e.name not in stub_names and st.soname in stublib.needed(e)
            ]
            stublib.build(st, libs[st.soname], consumers, lib / st.soname)
    # Loaded with dlopen/ctypes, so no ELF names them: kept whatever the pruning finds.
    prune_libraries(out, keep=["libudev.so.1", "ld-linux-x86-64.so.2"])
    rt.libraries = sorted(p.name for p in lib.iterdir())
    strip(f for f in elf_files(out) if f.name != "seedboot-agent" and not f.name.startswith("ld-linux"))
    for f in elf_files(out):
        if f.name != "seedboot-agent" and drop_search_paths(f):
            log.debug("dropped RUNPATH of %s", f.name)
    return rt


def size_of(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    r = freeze(Path(sys.argv[1]))
    print(
        f"{r.root}: {size_of(r.root) / 1e6:.1f} MB, {len(r.modules)} stdlib modules, {len(r.libraries)} libs"
    )
