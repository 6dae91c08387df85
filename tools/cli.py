"""The ``seedboot`` command: one subcommand per module, errors as one line and a non-zero exit.

Each module in COMMAND_MODULES defines ``add_parser(sub)``, which adds its subcommand(s)
and sets ``func`` (taking the parsed arguments, returning an exit code) as the default.
Modules are imported only when listed here, so each command loads just what it needs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from seedboot.agent.errors import SeedError, report

COMMAND_MODULES: tuple[str, ...] = (
    "seedboot.tools.keygen_cmd",
    "seedboot.tools.keys_cmd",
    "seedboot.tools.publish_cmd",
    "seedboot.tools.verify_cmd",
    "seedboot.tools.cat_cmd",
    "seedboot.tools.info_cmd",
    "seedboot.tools.gc_cmd",
    "seedboot.tools.kernel_cmd",
    "seedboot.tools.mkinitramfs_cmd",
    "seedboot.tools.demoroot_cmd",
    "seedboot.tools.proxy_cmd",
    "seedboot.tools.mkseed_cmd",
    "seedboot.tools.demo_cmd",
    "seedboot.agent.mount_cmd",
)

log = logging.getLogger("seedboot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seedboot",
        description="Publish OS images as signed block mirrors and boot them from tiny seed disks.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log decisions (-vv: debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SeedError as e:
        if args.debug:
            raise
        report(f"seedboot {args.command}", e)
        return 1
    except KeyboardInterrupt:
        print(f"seedboot {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which has exited: not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
