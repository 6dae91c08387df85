"""Publishing real ext4 images into a mirror tree, and reading them back through the agent's format code."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from seedboot.agent import blocks, layout, release
from seedboot.agent.reader import DirReader
from seedboot.tools import keys, publish
from tests.helpers import keypair, make_ext4, make_tree, sha256_file

SEEDBOOT = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "seedboot")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEEDBOOT, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source tree, its ext4 image and a key pair, built once for the module."""
    d = tmp_path_factory.mktemp("publish")
    make_tree(d / "src")
    make_ext4(d / "src", d / "v1.ext4")
    keypair(d, "k")
    return d


def rebuild(mirror: Path, name: str, pub: Path, version: int | None = None) -> bytes:
    """The image as the agent's format code sees it: signature, index digest, every block verified."""
    rel = release.open_release(DirReader(mirror), name, release.load_keys([pub]), version)
    out = bytearray()
    for i in range(rel.index.nblocks):
        n = rel.index.plain_len(i)
        if rel.index.is_hole(i):
            out += bytes(n)
            continue
        d = rel.index.digest_hex(i)
        out += blocks.verify((mirror / layout.block_path(d)).read_bytes(), d, rel.index.lengths[i], n)
    return bytes(out)


def test_publish_round_trip_and_minisign(work: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    r = run_cli("publish", work / "v1.ext4", "--mirror", mirror, "--name", "demo", "--key", work / "k.key")
    assert r.returncode == 0, r.stderr
    assert "published demo version 1" in r.stdout and "holes" in r.stdout
    assert (mirror / "demo" / "latest").read_text().strip() == "1"
    data = rebuild(mirror, "demo", work / "k.pub")
    assert hashlib.sha256(data).hexdigest() == sha256_file(work / "v1.ext4")
    # Debian's stock minisign verifies the signed metadata, and the trusted comment names it.
    meta = mirror / "demo" / "meta" / "1.json"
    v = subprocess.run(
        ["minisign", "-V", "-p", str(work / "k.pub"), "-m", str(meta)], capture_output=True, text=True
    )
    assert v.returncode == 0, v.stderr
    assert "image:demo" in v.stdout and "version:1" in v.stdout
    assert hashlib.sha256(meta.read_bytes()).hexdigest() in v.stdout


def test_publish_api_stats_holes_and_dedup(work: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    key = keys.load_secret_key(work / "k.key")
    res = publish.publish(work / "v1.ext4", mirror, "demo", key, block_size=64 * 1024)
    s = res.stats
    assert s.blocks == s.new + s.reused + s.holes
    assert s.holes > 0  # free space of the filesystem and the sparse file
    assert s.reused > 0  # random.bin and random-copy.bin share their blocks
    stored = sorted((mirror / "blocks").rglob("*"))
    assert len([p for p in stored if p.is_file()]) == s.new
    # The same image under another name stores nothing new.
    again = publish.publish(work / "v1.ext4", mirror, "copy", key, block_size=64 * 1024)
    assert again.stats.new == 0 and again.stats.bytes_written == 0
