"""``seedboot keygen --out PREFIX``: a minisign-compatible Ed25519 key pair."""

from __future__ import annotations

import argparse

from seedboot.tools import keys


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="make a signing key pair (PREFIX.key, mode 0600, and PREFIX.pub)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="write PREFIX.key and PREFIX.pub")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    key_path, pub_path, key = keys.write_keypair(args.out, force=args.force)
    print(f"key id {key.public_key.id_str}: secret {key_path} (mode 0600), public {pub_path}")
    return 0
