"""Compiled code for the source that dataclasses, attrs and namedtuple generate while importing.

Each ``@dataclass``, attrs class and ``namedtuple`` writes its methods as Python source and
compiles it at import time: about a fifth of the agent's and the block daemon's import time,
and compiling is dear under emulation. The freezer (``tools/freeze.py``) imports the agent's
modules once on the build host with ``record()``, and stores the code objects next to the
runtime; the frozen agent ``install()``s them at start, so ``compile``/``exec``/``eval`` of a
recorded string returns the stored code instead of compiling it. A string that was not recorded
compiles as usual, so a stale or missing cache only costs time.

The cache is keyed by the exact source, file name, mode and inherited ``__future__`` flags, and
the stored code was compiled by the same interpreter (the runtime ships the build's libpython).
"""

import builtins
import marshal
import os
import sys
from typing import Any

FILE_NAME = "codecache.marshal"
# The __future__ flags compile() inherits from its caller (CO_FUTURE_DIVISION ... ANNOTATIONS).
FUTURE_FLAGS = 0x1FE0000

Key = tuple[str, str, str, int]
_cache: dict[Key, Any] = {}
_recording = False
_compile = builtins.compile
_exec = builtins.exec
_eval = builtins.eval


def default_path() -> str:
    """Next to the frozen ``seedboot`` package: ``python/seedboot/codecache.marshal``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), FILE_NAME)


def _code(source: str, filename: str, mode: str, flags: int) -> Any:
    key = (source, filename, mode, flags)
    code = _cache.get(key)
    if code is None:
        code = _compile(source, filename, mode, flags, True)
        if _recording:
            _cache[key] = code
    return code


def _inherited(depth: int = 2) -> int:
    return sys._getframe(depth).f_code.co_flags & FUTURE_FLAGS


def compile_(
    source: Any,
    filename: Any,
    mode: str,
    flags: int = 0,
    dont_inherit: bool = False,
    optimize: int = -1,
    **kw: Any,
) -> Any:
    if not dont_inherit:
        flags |= _inherited()
    if type(source) is str and not (flags & ~FUTURE_FLAGS) and optimize == -1 and not kw:
        return _code(source, os.fsdecode(filename), mode, flags)
    return _compile(source, filename, mode, flags, True, optimize, **kw)


def _namespaces(globals_: Any, locals_: Any) -> tuple[Any, Any]:
    if globals_ is None:
        frame = sys._getframe(2)
        return frame.f_globals, frame.f_locals if locals_ is None else locals_
    return globals_, locals_


def exec_(source: Any, globals_: Any = None, locals_: Any = None, /, **kw: Any) -> None:
    if type(source) is str:
        source = _code(source, "<string>", "exec", _inherited())
    g, loc = _namespaces(globals_, locals_)
    _exec(source, g, loc, **kw)


def eval_(source: Any, globals_: Any = None, locals_: Any = None, /) -> Any:
    if type(source) is str:
        source = _code(source.lstrip(" \t"), "<string>", "eval", _inherited())
    g, loc = _namespaces(globals_, locals_)
    return _eval(source, g, loc)


def _hook() -> None:
    builtins.compile = compile_
    builtins.exec = exec_
    builtins.eval = eval_


def install(path: str | None = None) -> int:
    """Use the stored code (at PATH, or next to the runtime); returns how many entries."""
    try:
        with open(path or default_path(), "rb") as f:
            loaded = marshal.loads(f.read())
    except (OSError, ValueError, EOFError, TypeError):
        return 0
    if not isinstance(loaded, dict):
        return 0
    _cache.update(loaded)
    _hook()
    return len(loaded)


def record() -> None:
    """Start keeping what is compiled (the freezer, on the build host)."""
    global _recording
    _recording = True
    _hook()


def save(path: str) -> int:
    with open(path, "wb") as f:
        f.write(marshal.dumps(_cache))
    return len(_cache)


def agent_modules(root: str) -> list[str]:
    """Every module of the agent package under ROOT (sources here, sourceless .pyc when frozen)."""
    names = set()
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(top, root)
        pkg = "seedboot.agent" + ("" if rel == "." else "." + rel.replace(os.sep, "."))
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext in (".py", ".pyc") and stem != "__main__":
                names.add(pkg if stem == "__init__" else f"{pkg}.{stem}")
    return sorted(names)
