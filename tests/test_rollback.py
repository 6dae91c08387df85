"""Rollback protection through the state directory, and the early-boot clock."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from seedboot.agent import release, rollback, signature
from seedboot.agent.errors import MetadataExpired, SeedError
from seedboot.agent.reader import DirReader
from seedboot.tools import keys, publish
from tests.helpers import keypair


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Versions 1..3 of one image, signed by the root key."""
    d = tmp_path_factory.mktemp("rollback")
    keypair(d, "root")
    key = keys.load_secret_key(d / "root.key")
    for v in (1, 2, 3):
        (d / "image.bin").write_bytes(os.urandom(128 * 1024))
        publish.publish(d / "image.bin", d / "m", "demo", key, block_size=64 * 1024, version=v)
    return d


def open_v(mirror: Path, version: int | None, state: Path, **kw: object) -> release.Release:
    roots = [signature.load_public_key(mirror / "root.pub")]
    return release.open_release(DirReader(mirror / "m"), "demo", roots, version, state_dir=state, **kw)  # type: ignore[arg-type]


def test_older_version_refused_after_newer_seen(mirror: Path, tmp_path: Path) -> None:
    state = tmp_path / "knxblock"
    open_v(mirror, 2, state)
    assert json.loads((state / ".trust" / "state.json").read_text())["images"] == {"demo": 2}
    with pytest.raises(rollback.RollbackRefused, match="version 1 is older than version 2 seen before") as e:
        open_v(mirror, 1, state)
    assert "seed.version=" in e.value.hint
    # Latest moves the mark up; the same version again is fine.
    assert open_v(mirror, None, state).meta.version == 3
    open_v(mirror, 3, state)
    assert rollback.load_state(state).highest("demo") == 3


def test_older_version_when_chosen_says_so(mirror: Path, tmp_path: Path) -> None:
    state = tmp_path / "knxblock"
    open_v(mirror, 3, state)
    rel = open_v(mirror, 1, state, allow_older=True)
    assert rel.meta.version == 1
    assert any("booting older version 1 of demo as requested (highest seen is 3)" in n for n in rel.notes)
    # Choosing an older version does not lower the mark.
    assert rollback.load_state(state).highest("demo") == 3


def test_refusal_leaves_state_and_other_images_alone(tmp_path: Path) -> None:
    st = rollback.load_state(tmp_path)
    st.note_image("a", 5)
    st.note_image("b", 2)
    st.note_keys(4)
    st.save()
    again = rollback.load_state(tmp_path)
    assert (again.images, again.keys) == ({"a": 5, "b": 2}, 4)
    assert "first seen" in again.check_image("c", 1)
    with pytest.raises(rollback.RollbackRefused):
        again.check_image("a", 4)
    assert not again.note_image("a", 3) and again.highest("a") == 5
    # No temp files left behind by the atomic write.
    assert [p.name for p in (tmp_path / ".trust").iterdir()] == ["state.json"]


def test_damaged_state_starts_over(tmp_path: Path) -> None:
    p = rollback.state_path(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    st = rollback.load_state(tmp_path)
    assert st.images == {} and st.path == p
    st.note_image("demo", 1)
    st.save()
    assert rollback.load_state(tmp_path).highest("demo") == 1


def test_clock_choice() -> None:
    now = time.time()
    # Local clock ahead of or near the mirror: local wins.
    c = rollback.choose_time(local=now, server_date=now - 30, tolerance=60)
    assert c.source == "local clock" and c.now == now
    c = rollback.choose_time(local=now, server_date=now + 30, tolerance=60)
    assert c.source == "local clock"
    # Local clock far behind (RTC at 1970 or 2001): the mirror's Date is a floor.
    c = rollback.choose_time(local=1_000_000_000, server_date=now, tolerance=60)
    assert c.source == "mirror Date header" and c.now == now
    assert "mirror Date header (tolerance 60 s)" in c.describe()
    # No Date header at all (a local mirror): the local clock, said so.
    assert rollback.choose_time(local=now, server_date=None).source == "local clock"
    with pytest.raises(SeedError, match="out of range"):
        rollback.choose_time(tolerance=rollback.MAX_TOLERANCE + 1)


def test_expired_metadata_and_tolerance(mirror: Path, tmp_path: Path) -> None:
    meta = json.loads((mirror / "m" / "demo" / "meta" / "3.json").read_text())
    late = meta["expires"] + 100
    with pytest.raises(MetadataExpired, match="expired on"):
        open_v(mirror, 3, tmp_path, now=late)
    rel = open_v(mirror, 3, tmp_path, now=late, tolerance=200)
    assert rel.clock is not None and "tolerance 200 s" in rel.clock.describe()
