"""``seedboot proxy --listen HOST:PORT --upstream HOST:PORT --rtt 100ms [--rate 10M]``.

A TCP proxy that adds latency (and optionally a bandwidth cap), for trying seedboot over a
slow network on a machine without netem. See ``latency_proxy`` for the model.
"""

from __future__ import annotations

import argparse
import asyncio
import re

from seedboot.agent.errors import SeedError
from seedboot.tools import latency_proxy

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgG]i?)?(bit|b|B)?(?:/s)?\s*$")
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_duration(text: str) -> float:
    """'100ms', '0.1s' or a bare number of milliseconds, in seconds."""
    m = _DURATION.match(text)
    if not m:
        raise SeedError(f"not a duration: {text!r}", hint="write e.g. 100ms or 0.1s")
    value = float(m.group(1))
    return value if m.group(2) == "s" else value / 1000


def parse_rate(text: str) -> float:
    """'10M' (bytes/s, SI prefixes), '8Mi', '80Mbit', in bytes per second."""
    m = _RATE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise SeedError(f"not a rate: {text!r}", hint="write bytes per second, e.g. 10M, 512K, 8Mi or 80Mbit")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    return value / 8 if m.group(3) == "bit" else value


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SeedError(f"not HOST:PORT: {text!r}", hint="write e.g. 127.0.0.1:8080")
    return host or "127.0.0.1", int(port)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("proxy", help="TCP proxy that adds latency and a bandwidth cap (no netem needed)")
    p.add_argument(
        "--listen",
        default="127.0.0.1:9000",
        metavar="HOST:PORT",
        help="where to listen (0.0.0.0:PORT lets a QEMU guest use 10.0.2.2:PORT; default %(default)s)",
    )
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the server to forward to")
    p.add_argument(
        "--rtt",
        default="0ms",
        help="round-trip time to add, half each way (100ms, 0.1s; default %(default)s)",
    )
    p.add_argument("--rate", help="bandwidth cap in bytes/s per direction (10M, 8Mi, 80Mbit)")
    p.add_argument(
        "--rate-scope",
        choices=("connection", "total"),
        default="connection",
        help="cap each connection or all together (default %(default)s)",
    )
    p.add_argument(
        "--no-handshake", action="store_true", help="do not charge a new connection one RTT before its data"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    listen = parse_hostport(args.listen)
    upstream = parse_hostport(args.upstream)
    rtt = parse_duration(args.rtt)
    rate = parse_rate(args.rate) if args.rate else None
    try:
        asyncio.run(
            latency_proxy.serve_forever(
                listen, upstream, rtt, rate, args.rate_scope, handshake=not args.no_handshake
            )
        )
    except OSError as e:
        raise SeedError(
            f"cannot listen on {args.listen}: {e.strerror or e}", hint="pick a free port with --listen"
        ) from e
    return 0
