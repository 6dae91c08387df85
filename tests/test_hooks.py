"""Hooks: real executables in tmp directories, run in name order, overridden by the seed disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from seedboot.agent import hooks
from seedboot.agent.hooks import HookFailed

REPO = Path(__file__).resolve().parent.parent


def hook(root: Path, point: str, name: str, body: str) -> Path:
    d = root / f"{point}.d"
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return p


def test_points_cover_every_stage_but_post_switch() -> None:
    assert "pre-early" in hooks.POINTS and "post-trust" in hooks.POINTS and "pre-switch" in hooks.POINTS
    assert "post-switch" not in hooks.POINTS
    with pytest.raises(Exception, match="unknown hook point"):
        hooks.collect("pre-pivot", [])


def test_name_order_override_and_disable(tmp_path: Path) -> None:
    builtin, seed = tmp_path / "builtin", tmp_path / "seed"
    log = tmp_path / "log"
    hook(builtin, "post-network", "20-b", f"echo builtin-b >> {log}")
    hook(builtin, "post-network", "10-a", f"echo builtin-a >> {log}")
    hook(builtin, "post-network", "30-c", f"echo builtin-c >> {log}")
    hook(seed, "post-network", "20-b", f'echo seed-b "$SEED_STAGE" "$SEED_POINT" "$SEED_MIRROR" >> {log}')
    hook(seed, "post-network", "15-x", f"echo seed-x >> {log}")
    (seed / "post-network.d" / "30-c").write_text("")  # an empty file disables the built-in one
    results = hooks.run_point(
        "post-network", [builtin, seed], {"SEED_STAGE": "network", "SEED_MIRROR": "http://m"}
    )
    assert [r.hook.name for r in results] == ["10-a", "15-x", "20-b"]
    assert log.read_text().splitlines() == ["builtin-a", "seed-x", "seed-b network post-network http://m"]


def test_failure_stops_with_name_and_output(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hook(tmp_path, "pre-root", "10-bad", "echo disk not ready; exit 3")
    hook(tmp_path, "pre-root", "20-after", f"echo ran >> {log}")
    with pytest.raises(HookFailed) as e:
        hooks.run_point("pre-root", [tmp_path], {})
    assert "pre-root/10-bad exited with 3: disk not ready" in e.value.message
    assert "optional" in e.value.hint
    assert not log.exists()


@pytest.mark.parametrize("marker", ["name", "line"])
def test_optional_failure_goes_on(tmp_path: Path, marker: str) -> None:
    log = tmp_path / "log"
    if marker == "name":
        hook(tmp_path, "pre-cache", "10-try.optional", "exit 1")
    else:
        hook(tmp_path, "pre-cache", "10-try", "# seedboot: optional\nexit 1")
    hook(tmp_path, "pre-cache", "20-after", f"echo ran >> {log}")
    results = hooks.run_point("pre-cache", [tmp_path], {})
    assert [r.ok for r in results] == [False, True]
    assert log.read_text() == "ran\n"


def test_timeout_kills_the_hook_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    hook(tmp_path, "pre-mirror", "10-slow", f"# seedboot: timeout=1\nsleep 60 & echo $! > {pidfile}; wait")
    with pytest.raises(HookFailed, match="timed out after 1s"):
        hooks.run_point("pre-mirror", [tmp_path], {})
    child = int(pidfile.read_text())
    time.sleep(0.2)
    try:  # gone, or a zombie waiting for whoever reaps orphans here
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), state


def test_not_executable_is_an_error_with_the_fix(tmp_path: Path) -> None:
    p = hook(tmp_path, "post-cache", "10-x", "true")
    p.chmod(0o644)
    with pytest.raises(HookFailed) as e:
        hooks.collect("post-cache", [tmp_path])
    assert e.value.hint == f"chmod +x {p}"


def test_shipped_hooks(tmp_path: Path) -> None:
    """The shipped pre-switch hooks copy SSH keys from the cache and write the DHCP hostname."""
    cache, newroot = tmp_path / "knxblock", tmp_path / "newroot"
    (cache / "ssh").mkdir(parents=True)
    (cache / "ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA test@host\n")
    (newroot / "etc").mkdir(parents=True)
    env = {
        "SEED_CACHE": str(cache),
        "SEED_NEWROOT": str(newroot),
        "SEED_HOSTNAME": "seedbox",
        "SEED_STAGE": "switch",
    }
    names = [h.name for h in hooks.collect("pre-switch", [REPO / "hooks"])]
    assert names, "no shipped pre-switch hooks"
    results = hooks.run_point("pre-switch", [REPO / "hooks"], env)
    assert all(r.ok for r in results), [r.output for r in results]
    keys = newroot / "root" / ".ssh" / "authorized_keys"
    assert keys.read_text() == "ssh-ed25519 AAAA test@host\n"
    assert keys.stat().st_mode & 0o777 == 0o600
    assert (newroot / "etc" / "hostname").read_text() == "seedbox\n"
    # Nothing to copy and no hostname: the hooks do nothing and succeed.
    empty = tmp_path / "empty"
    (empty / "etc").mkdir(parents=True)
    env = {"SEED_CACHE": str(tmp_path / "none"), "SEED_NEWROOT": str(empty), "SEED_HOSTNAME": ""}
    assert all(r.ok for r in hooks.run_point("pre-switch", [REPO / "hooks"], env))
    assert not (empty / "etc" / "hostname").exists() and not (empty / "root").exists()
