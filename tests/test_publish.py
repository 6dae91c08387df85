"""Publishing real ext4 images into a mirror tree, and reading them back through the agent's format code."""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from seedboot.agent import blocks, layout, metadata, profile, release
from seedboot.agent import index as index_mod
from seedboot.agent.reader import DirReader
from seedboot.tools import keys, publish
from tests.helpers import Nginx, keypair, make_ext4, make_tree, sha256_file

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
        assert n in r.stderr, r.stderr


def test_cat_over_nginx_is_byte_identical(
    work: Path, published: Path, tmp_path: Path, nginx: Callable[..., Nginx]
) -> None:
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


def test_verify_names_each_bad_block(
    work: Path, published: Path, tmp_path: Path, nginx: Callable[..., Nginx]
) -> None:
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


def test_v2_reuses_blocks_and_v1_stays_valid(work: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "m"
    src2 = tmp_path / "src2"
    shutil.copytree(work / "src", src2)
    (src2 / "etc" / "hostname").write_text("seedboot-test-v2\n")
    v2 = make_ext4(src2, tmp_path / "v2.ext4")
    key = work / "k.key"
    assert (
        run_cli("publish", work / "v1.ext4", "--mirror", mirror, "--name", "demo", "--key", key).returncode
        == 0
    )
    r = run_cli("publish", v2, "--mirror", mirror, "--name", "demo", "--key", key, "--expires", "90d")
    assert r.returncode == 0 and "version 2" in r.stdout, r.stderr
    new = int(r.stdout.split(" new,")[0].rsplit(" ", 1)[-1])
    reused = int(r.stdout.split(" reused,")[0].rsplit(" ", 1)[-1])
    assert 0 < new <= (new + reused) // 10, r.stdout  # only what the changed file touched
    assert (mirror / "demo" / "latest").read_text().strip() == "2"
    # Rollback: version 1 is still there, signed, complete and byte-identical.
    assert hashlib.sha256(rebuild(mirror, "demo", work / "k.pub", 1)).hexdigest() == sha256_file(
        work / "v1.ext4"
    )
    assert hashlib.sha256(rebuild(mirror, "demo", work / "k.pub")).hexdigest() == sha256_file(v2)
    info = run_cli("info", "--mirror", mirror)
    assert info.returncode == 0, info.stderr
    assert "demo: 2 version(s), latest 2" in info.stdout and "with the version before" in info.stdout
    # An older version number is refused; the same content under an existing one is re-signed.
    r = run_cli("publish", v2, "--mirror", mirror, "--name", "demo", "--key", key, "--version", "1")
    assert_one_line_error(r, "version 1 of demo exists with different content")
    r = run_cli("publish", v2, "--mirror", mirror, "--name", "demo", "--key", key, "--version", "2")
    assert r.returncode == 0 and "re-signed demo version 2" in r.stdout, r.stderr
    # gc --keep 1 drops version 1 and exactly the blocks only it used; version 2 still verifies.
    only_v1 = {p.name for p in (mirror / "blocks").rglob("*") if p.is_file()} - {
        d.hex()
        for d in release.open_release(
            DirReader(mirror), "demo", release.load_keys([work / "k.pub"])
        ).index.digests
    }
    g = run_cli("gc", "--mirror", mirror, "--keep", "1")
    assert g.returncode == 0, g.stderr
    assert "removed demo version 1" in g.stdout and not (mirror / "demo" / "meta" / "1.json").exists()
    assert len(only_v1) == new  # v1's blocks that v2 replaced
    assert not any(p.name in only_v1 for p in (mirror / "blocks").rglob("*"))
    assert run_cli("verify", "--mirror", mirror, "--name", "demo", "--pubkey", work / "k.pub").returncode == 0
    # The dm-verity tree (published by default) of the dropped version went too; a damaged
    # tree of the kept one is reported like a bad block.
    tree, packed = sorted((mirror / "demo" / "verity").iterdir())
    assert packed.name == f"{tree.name}.zst"
    damaged = bytearray(tree.read_bytes())
    damaged[0] ^= 1
    tree.write_bytes(bytes(damaged))
    r = run_cli("verify", "--mirror", mirror, "--name", "demo", "--pubkey", work / "k.pub")
    assert r.returncode == 1 and f"dm-verity tree {tree.name}" in r.stderr and str(tree) in r.stderr
    # So is a truncated copy of its compressed form, which booting agents fetch.
    damaged[0] ^= 1
    tree.write_bytes(bytes(damaged))
    packed.write_bytes(packed.read_bytes()[:-1])
    r = run_cli("verify", "--mirror", mirror, "--name", "demo", "--pubkey", work / "k.pub")
    assert r.returncode == 1 and str(packed) in r.stderr and "the metadata says" in r.stderr, r.stderr


def test_gc_keeps_every_referenced_block(work: Path, published: Path, tmp_path: Path) -> None:
    mirror = copy_mirror(published, tmp_path / "m")
    stray = mirror / "blocks" / "00" / ("0" * 64)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"left by a publish that died")
    before = snapshot(mirror)
    dry = run_cli("gc", "--mirror", mirror, "--dry-run")
    assert dry.returncode == 0 and f"would remove {stray}" in dry.stdout and snapshot(mirror) == before
    g = run_cli("gc", "--mirror", mirror)
    assert g.returncode == 0 and f"removed {stray}" in g.stdout, g.stdout
    assert not stray.exists()
    del before[str(stray.relative_to(mirror))]
    assert snapshot(mirror) == before
    assert run_cli("verify", "--mirror", mirror, "--name", "demo", "--pubkey", work / "k.pub").returncode == 0


def test_killed_publish_leaves_previous_version_valid(work: Path, published: Path, tmp_path: Path) -> None:
    mirror = copy_mirror(published, tmp_path / "m")
    # 48 MB of four-letter noise: slow to compress at level 19, so the kill lands mid-publish.
    rng = random.Random(7)
    big = tmp_path / "big.img"
    big.write_bytes(rng.randbytes(48 << 20).translate(bytes(b"ACGT"[i % 4] for i in range(256))))
    before = {p.name for p in (mirror / "blocks").rglob("*") if p.is_file()}
    cmd = [SEEDBOOT, "publish", str(big), "--mirror", str(mirror), "--name", "demo", "--level", "19"]
    proc = subprocess.Popen(
        [*cmd, "--key", str(work / "k.key")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if {p.name for p in (mirror / "blocks").rglob("*") if p.is_file()} - before:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "publish finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (mirror / "demo" / "latest").read_text().strip() == "1"
    assert not (mirror / "demo" / "meta" / "2.json").exists()
    r = run_cli("verify", "--mirror", mirror, "--name", "demo", "--pubkey", work / "k.pub")
    assert r.returncode == 0 and "version 1 OK" in r.stdout, r.stderr
    # The next publish goes through, and gc sweeps what the killed one left behind.
    r = run_cli("publish", big, "--mirror", mirror, "--name", "demo", "--key", work / "k.key", "--level", "1")
    assert r.returncode == 0 and "version 2" in r.stdout, r.stderr
    g = run_cli("gc", "--mirror", mirror)
    assert g.returncode == 0 and "removed" in g.stdout, g.stdout
    for v in ("1", "2"):
        r = run_cli(
            "verify", "--mirror", mirror, "--name", "demo", "--pubkey", work / "k.pub", "--version", v
        )
        assert r.returncode == 0, r.stderr


def test_bad_input_gives_one_line_and_damages_nothing(work: Path, published: Path, tmp_path: Path) -> None:
    mirror = copy_mirror(published, tmp_path / "m")
    key, pub = work / "k.key", work / "k.pub"
    loose = tmp_path / "loose.key"
    shutil.copy(key, loose)
    loose.chmod(0o644)
    _, other_pub = keypair(tmp_path, "other")
    sk = keys.load_secret_key(key)
    # An expired version of another image, and one whose signed index does not add up.
    publish.publish(work / "v1.ext4", mirror, "old", sk, now=time.time() - 7200, expires=3600)
    bad_index = bytearray(index_mod.Index(65536, 65536 * 2, [b"\1" * 32] * 2, [10, 10]).encode())
    bad_index[12:20] = (65536 * 5).to_bytes(8, "big")
    digest = hashlib.sha256(bad_index).hexdigest()
    (mirror / "odd" / "index").mkdir(parents=True)
    (mirror / "odd" / "index" / digest).write_bytes(bad_index)
    meta = metadata.Metadata("odd", 1, 0, 2**40, digest, len(bad_index), 65536 * 2, 65536)
    (mirror / "odd" / "meta").mkdir()
    (mirror / "odd" / "meta" / "1.json").write_bytes(meta.to_json())
    (mirror / "odd" / "meta" / "1.json.minisig").write_text(keys.sign(sk, meta.to_json(), "odd"))
    (mirror / "odd" / "latest").write_text("1\n")
    bad_profile = tmp_path / "bad.profile"
    bad_profile.write_bytes(profile.encode([0, 1, 10**6]))
    before = snapshot(mirror)
    pub_args = ("--mirror", mirror, "--key", key)
    cases: list[tuple[tuple[str | Path, ...], tuple[str, ...]]] = [
        (("publish", tmp_path / "nope.img", "--name", "demo", *pub_args), ("cannot read image",)),
        (("publish", work / "v1.ext4", "--name", "demo", "--mirror", mirror, "--key", loose), ("chmod 600",)),
        (("publish", work / "v1.ext4", "--name", "demo", "--mirror", mirror, "--key", pub), ("secret key",)),
        (("publish", work / "v1.ext4", "--name", "demo", *pub_args, "--block-size", "3000"), ("block size",)),
        (("publish", work / "v1.ext4", "--name", "demo", *pub_args, "--expires", "soon"), ("duration",)),
        (("publish", work / "v1.ext4", "--name", "../x", *pub_args), ("invalid image name",)),
        (("publish", work / "v1.ext4", "--name", "demo", *pub_args, "--version", "0"), ("invalid version",)),
        (("publish", work / "v1.ext4", "--name", "demo", *pub_args, "--profile", bad_profile), ("past the",)),
        (("verify", "--mirror", mirror, "--name", "nope", "--pubkey", pub), ("'nope' is not on mirror",)),
        (("verify", "--mirror", mirror, "--name", "demo", "--pubkey", other_pub), ("not trusted",)),
        (("verify", "--mirror", mirror, "--name", "demo", "--pubkey", pub, "--version", "9"), ("version 9",)),
        (("verify", "--mirror", mirror, "--name", "old", "--pubkey", pub), ("expired",)),
        (("verify", "--mirror", mirror, "--name", "odd", "--pubkey", pub), ("do not add up",)),
        (("cat", "--mirror", mirror, "--name", "odd", "--pubkey", pub, "--out", tmp_path / "o"), ("add up",)),
        (("info", "--mirror", mirror, "--name", "nope"), ("'nope' is not in mirror",)),
        (("info", "--mirror", tmp_path / "nothere"), ("does not exist",)),
        (("gc", "--mirror", mirror, "--keep", "0"), ("--keep 0",)),
    ]
    for args, needles in cases:
        assert_one_line_error(run_cli(*args), *needles)
        assert snapshot(mirror) == before, args
    assert not (tmp_path / "o").exists()
    assert run_cli("verify", "--mirror", mirror, "--name", "demo", "--pubkey", pub).returncode == 0


def test_profile_is_published_and_verified(work: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "m"
    prof = tmp_path / "boot.profile"
    prof.write_bytes(profile.encode([3, 0, 1, 200], times=[0.0, 0.1, 0.2, 0.3], nblocks=256))
    res = publish.publish(
        work / "v1.ext4", mirror, "demo", keys.load_secret_key(work / "k.key"), profile_file=prof
    )
    assert res.meta.profile == hashlib.sha256(prof.read_bytes()).hexdigest()
    stored = mirror / layout.profile_path("demo", res.meta.profile)
    assert stored.read_bytes() == prof.read_bytes()
    r = run_cli("verify", "--mirror", mirror, "--name", "demo", "--pubkey", work / "k.pub")
    assert r.returncode == 0, r.stderr
    stored.write_bytes(prof.read_bytes() + b"7\n")
    r = run_cli("verify", "--mirror", mirror, "--name", "demo", "--pubkey", work / "k.pub")
    assert r.returncode == 1 and "profile" in r.stderr and str(stored) in r.stderr, r.stderr


@pytest.mark.root
def test_full_disk_fails_cleanly_and_keeps_the_previous_version(
    work: Path, published: Path, tmp_path: Path
) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], check=True)
    try:
        mirror = copy_mirror(published, mnt / "m")
        noise = tmp_path / "noise.img"
        noise.write_bytes(random.Random(3).randbytes(16 << 20))
        r = run_cli("publish", noise, "--mirror", mirror, "--name", "demo", "--key", work / "k.key")
        assert_one_line_error(r, "cannot write to mirror", "No space left")
        assert (mirror / "demo" / "latest").read_text().strip() == "1"
        r = run_cli("verify", "--mirror", mirror, "--name", "demo", "--pubkey", work / "k.pub")
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
