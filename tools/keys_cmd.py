"""``seedboot keys rotate|revoke|show``: the root-signed statement of current signing keys."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from seedboot.agent import keyring, signature
from seedboot.agent.errors import SeedError
from seedboot.agent.reader import open_reader
from seedboot.tools import keyring_tools, keys


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "keys",
        help="rotate, revoke or show the signing keys the offline root key vouches for (MIRROR/keys.json)",
    )
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    r = ks.add_parser("rotate", help="list new signing key(s), unlist old ones, re-sign with a new expiry")
    _common(r)
    r.add_argument("--add", action="append", default=[], metavar="NEW.pub", help="a signing key to list")
    r.add_argument("--remove", action="append", default=[], metavar="ID", help="a key id to stop listing")
    r.set_defaults(func=run_rotate)

    v = ks.add_parser("revoke", help="revoke a signing key: machines refuse what it signs")
    _common(v)
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--key-id", metavar="ID", help="the key id (16 hex digits)")
    g.add_argument("--pubkey", metavar="K.pub", help="the key's public key file")
    v.set_defaults(func=run_revoke)

    s = ks.add_parser("show", help="verify and print a mirror's keys statement")
    s.add_argument("--mirror", required=True, metavar="DIR_OR_URL")
    s.add_argument("--pubkey", required=True, action="append", metavar="ROOT.pub", help="a trusted root key")
    s.set_defaults(func=run_show)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mirror", required=True, type=Path, metavar="DIR")
    p.add_argument("--root-key", required=True, metavar="ROOT.key", help="the offline root secret key")
    p.add_argument("--expires", default="365d", help="validity of the new statement (default 365d)")


def _describe(stmt: keyring.KeysStatement) -> str:
    lines = [f"keys statement version {stmt.version}, expires {stmt.expires_str()}"]
    lines += [f"  signing key {k.id_str}" for k in stmt.keys] or ["  no signing keys (only root keys sign)"]
    lines += [f"  revoked     {r}" for r in stmt.revoked]
    return "\n".join(lines)


def run_rotate(args: argparse.Namespace) -> int:
    root = keys.load_secret_key(args.root_key)
    add = [signature.load_public_key(p) for p in args.add]
    change = keyring_tools.rotate(
        args.mirror, root, add, args.remove, keyring_tools.parse_duration(args.expires)
    )
    print(f"{change.path}: version {change.previous} -> {change.stmt.version}")
    print(_describe(change.stmt))
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    root = keys.load_secret_key(args.root_key)
    key_id = args.key_id or signature.load_public_key(args.pubkey).id_str
    change = keyring_tools.revoke(args.mirror, root, key_id, keyring_tools.parse_duration(args.expires))
    print(f"{change.path}: version {change.previous} -> {change.stmt.version}, key {key_id.upper()} revoked")
    print(_describe(change.stmt))
    return 0


def run_show(args: argparse.Namespace) -> int:
    roots = [signature.load_public_key(p) for p in args.pubkey]
    reader = open_reader(args.mirror)
    stmt = keyring_tools.read_statement(reader, roots)
    if stmt is None:
        raise SeedError(
            f"no keys statement on {reader.location}", "create one with 'seedboot keys rotate --add'"
        )
    print(_describe(stmt))
    if time.time() > stmt.expires:
        print("  EXPIRED: machines refuse keys it lists; re-sign it with 'seedboot keys rotate'")
    return 0
