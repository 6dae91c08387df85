"""The frozen agent's entry point: ``seedboot-agent init|selftest|--version|mount|...``.

``init`` (also what PID 1 does when given nothing else) runs the boot stages. The block
device commands come from ``seedboot.agent.mount_cmd`` and are imported only when asked
for, so PID 1 never pays for FUSE: the block daemon is a process PID 1 forks early
(``seedboot.agent.prewarm``), named ``@seedboot-blockdev``, which runs ``blockdev_wait``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

RUNTIME_MODULES = ("pycurl", "seedboot.agent.pyfuse", "pyudev", "netifaces", "zstandard")
INIT_COMMANDS = ("init", "selftest", "--version", "-V", "-h", "--help", "blockdev-wait")
# What the block daemon imports: loaded ahead by ``blockdev-wait`` while PID 1 does other work.
DAEMON_MODULES = (
    "seedboot.agent.daemon",
    "seedboot.agent.fusefs",
    "seedboot.agent.fetcher",
    "seedboot.agent.mount_cmd",
    "seedboot.agent.release",
    "seedboot.agent.pyfuse",
    "asyncio",
    "pycurl",
    "zstandard",
    "seedboot.agent.signature",
)
NETWORK_MODULES = ("pycurl",)  # of those, what only fetching needs


def version() -> str:
    try:
        with open("/etc/initrd-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VERSION_ID="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        from importlib.metadata import version as dist_version

        return dist_version("seedboot")
    except Exception:
        return "unknown"


def _ed25519_known_answer() -> bool:
    """RFC 8032 section 7.1, test 1 (empty message), and the same signature on another message."""
    from seedboot.agent import ed25519

    pk = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    return ed25519.verify(pk, sig, b"") and not ed25519.verify(pk, sig, b"x")


def _asyncio_check() -> tuple[bool, str]:
    import asyncio
    import functools

    async def coro() -> None:
        pass

    def plain() -> None:
        pass

    class Ops:
        async def method(self) -> None:
            pass

    right = (
        asyncio.iscoroutinefunction(coro)
        and asyncio.iscoroutinefunction(functools.partial(coro))
        and asyncio.iscoroutinefunction(Ops().method)
        and not asyncio.iscoroutinefunction(plain)
        and not asyncio.iscoroutinefunction(functools.partial(plain))
        and not asyncio.iscoroutinefunction(print)
    )
    check = "coroutine check ok" if right else "coroutine check WRONG"
    lazy = [m for m in ("inspect", "tokenize", "textwrap", "ipaddress", "platform") if m not in sys.modules]
    return right, f"{check}; not imported: {', '.join(lazy) or 'none of the lazy ones'}"


def selftest() -> int:
    """Import everything the agent and the block daemon load at run time; print versions."""
    import importlib

    import seedboot.agent

    failed = []
    for name in RUNTIME_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception as e:
            failed.append(name)
            print(f"{name}: FAILED: {type(e).__name__}: {e}")
            continue
        ver = getattr(mod, "__version__", None) or getattr(mod, "version", None)
        if name == "pycurl":
            ver = mod.version
        elif name == "seedboot.agent.pyfuse":
            name, ver = "pyfuse3", f"{getattr(mod.pyfuse3, '__version__', '?')} (asyncio mode, no trio)"
        print(f"{name}: {ver}")
    # Before the agent's own modules, which may import it: the frozen asyncio loads without
    # inspect (tools/freeze.py PATCHES) and still tells coroutine functions from others.
    asyncio_ok, asyncio_note = _asyncio_check()
    print(f"asyncio: {asyncio_note}")
    if not asyncio_ok:
        failed.append("asyncio")
    if _ed25519_known_answer():
        print("ed25519: libcrypto ok")
    else:
        failed.append("ed25519")
        print("ed25519: FAILED: RFC 8032 test vector did not verify through libcrypto")
    from seedboot.agent.codecache import agent_modules

    for name in agent_modules(seedboot.agent.__path__[0]):
        try:
            importlib.import_module(name)
        except Exception as e:
            failed.append(name)
            print(f"{name}: FAILED: {type(e).__name__}: {e}")
    if failed:
        print(f"seedboot-agent selftest FAILED: {', '.join(failed)}")
        return 1
    print("seedboot-agent selftest ok")
    return 0


def _block_commands(argv: list[str]) -> int:
    import argparse

    from seedboot.agent import mount_cmd
    from seedboot.agent.errors import SeedError, report

    parser = argparse.ArgumentParser(prog="seedboot-agent")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    mount_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except SeedError as e:
        report(f"seedboot-agent {args.command}", e)
        return 1


def blockdev_wait(args: list[str]) -> int:
    """Import the block daemon's modules now, then wait for its command line on ``--opts-fd``.

    The boot forks a process into this early (``seedboot.agent.prewarm``), so the daemon's
    imports (seconds under emulation) overlap the hardware, network and trust stages; it is
    also a command (``seedboot-agent blockdev-wait``) for an exec'd start. An empty command
    line (the boot went another way) ends it."""
    import importlib
    import json

    if (
        len(args) not in (2, 3)
        or args[0] != "--opts-fd"
        or not args[1].isdigit()
        or args[2:3] not in ([], ["--offline"])
    ):
        print("usage: seedboot-agent blockdev-wait --opts-fd FD [--offline]", file=sys.stderr)
        return 2
    fd = int(args[1])
    # offline, nothing is fetched: pycurl (libcurl, OpenSSL: 0.12 s under emulation) stays out
    modules = [m for m in DAEMON_MODULES if not (args[2:] and m in NETWORK_MODULES)]
    # Import only when PID 1 is idle: it is on the boot's critical path, this is not (yet).
    # PID 1 sets the priority back before it hands over the command line.
    os.nice(10)
    import time

    for name in modules:
        try:
            t = time.monotonic()
            importlib.import_module(name)
            print(f"blockdev-wait: {name} imported in {time.monotonic() - t:.2f}s", flush=True)
        except ImportError as e:
            print(f"seedboot-agent blockdev-wait: cannot import {name}: {e}", file=sys.stderr)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    argv = json.loads(b"".join(chunks) or b"[]")
    if not argv:
        return 0
    return _block_commands([str(a) for a in argv])


USAGE = """usage: seedboot-agent init | selftest | --version | mount|umount|status ...
  init       boot: run the stages (what PID 1 runs)
  selftest   import every run-time dependency and print versions
  mount ...  the block device (see seedboot-agent mount --help)
"""


def frozen() -> bool:
    return os.path.basename(sys.executable).startswith("seedboot-agent")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if frozen() and args[:1] != ["--version"]:
        from seedboot.agent import codecache

        codecache.install()
    if os.getpid() == 1 and (not args or (args[0] not in INIT_COMMANDS and args[0].startswith("-"))):
        args = ["init"]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("--version", "-V"):
        print(f"seedboot-agent {version()}")
        return 0
    if args[0] == "selftest":
        return selftest()
    if args[0] == "blockdev-wait":
        return blockdev_wait(args[1:])
    if args[0] == "init":
        from seedboot.agent.stages.runner import init

        return init(args[1:])
    return _block_commands(args)


if __name__ == "__main__":
    sys.exit(main())
