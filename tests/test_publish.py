"""Publishing real ext4 images into a mirror tree, and reading them back through the agent's format code."""

from __future__ import annotations

import hashlib
import shutil
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


# --- verify, cat, rollback, crash safety, bad input (the real CLI, as a user runs it) ---


@pytest.fixture(scope="module")
def published(work: Path) -> Path:
    """A mirror holding version 1 of ``demo``; tests that damage it work on a copy."""
    mirror = work / "mirror"
    publish.publish(work / "v1.ext4", mirror, "demo", keys.load_secret_key(work / "k.key"))
    return mirror


def copy_mirror(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines and ": error: " in lines[0] and all(ln.startswith("  hint:") for ln in lines[1:]), r.stderr
    for n in needles:
        assert n in lines[0], r.stderr


def test_cat_over_nginx_is_byte_identical(work: Path, published: Path, tmp_path: Path, nginx) -> None:  # type: ignore[no-untyped-def]
    srv = nginx(published)
    out = tmp_path / "back.img"
    r = run_cli("cat", "--mirror", srv.url, "--name", "demo", "--pubkey", work / "k.pub", "--out", out)
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == sha256_file(work / "v1.ext4")
    assert not (tmp_path / "back.img.tmp").exists()
    # Holes stay sparse, and each distinct block was fetched exactly once.
    assert out.stat().st_blocks * 512 < out.stat().st_size
    block_gets = [r for r in srv.requests() if r.startswith("GET /blocks/")]
    assert len(block_gets) == len(set(block_gets)) == len(list((published / "blocks").rglob("*/*")))
    r = run_cli("verify", "--mirror", srv.url, "--name", "demo", "--pubkey", work / "k.pub")
    assert r.returncode == 0 and "version 1 OK" in r.stdout, r.stderr


def test_verify_names_each_bad_block(work: Path, published: Path, tmp_path: Path, nginx) -> None:  # type: ignore[no-untyped-def]
    mirror = copy_mirror(published, tmp_path / "m")
    files = sorted(p for p in (mirror / "blocks").rglob("*") if p.is_file())
    flipped, truncated, missing = files[0], files[1], files[2]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-7])
    missing.unlink()
    srv = nginx(mirror)
    for loc, where in ((str(mirror), str(mirror)), (srv.url, srv.url)):
        r = run_cli("verify", "--mirror", loc, "--name", "demo", "--pubkey", work / "k.pub")
        assert r.returncode == 1 and "Traceback" not in r.stderr
        bad = [ln for ln in r.stderr.splitlines() if "block #" in ln]
        assert len(bad) == 3, r.stderr
        for p, why in ((flipped, "digest mismatch"), (truncated, "index says"), (missing, "")):
            (line,) = [ln for ln in bad if p.name[:16] in ln]
            assert why in line and f"{where}/blocks/{p.parent.name}/{p.name}" in line, line
    out = tmp_path / "out.img"
    r = run_cli("cat", "--mirror", srv.url, "--name", "demo", "--pubkey", work / "k.pub", "--out", out)
    assert_one_line_error(r, "block #")
    assert not out.exists() and not (tmp_path / "out.img.tmp").exists()


def test_tampered_metadata_fails_verify(work: Path, published: Path, tmp_path: Path) -> None:
    mirror = copy_mirror(published, tmp_path / "m")
    meta = mirror / "demo" / "meta" / "1.json"
    meta.write_bytes(meta.read_bytes().replace(b'"version": 1', b'"version": 1 '))
    r = run_cli("verify", "--mirror", mirror, "--name", "demo", "--pubkey", work / "k.pub")
    assert_one_line_error(r, "signature", "1.json", "invalid")
