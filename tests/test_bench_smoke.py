"""The boot benchmark's smoke mode, so the harness cannot rot: a tiny busybox "OS" booted from
local disk (a) and through QEMU's curl driver behind the latency proxy (e4), one run each
(~30 s). It checks what a user reads in the table, never the times themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import boot, seedboot_runs
from seedboot.tools import diskimage
from tests import artifacts


@pytest.mark.qemu
def test_smoke_run_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = str(artifacts.kernel_dir())
    assert boot.main(["--smoke", "--no-plots", "--out", str(tmp_path), "--kernel", kernel]) == 0
    out = capsys.readouterr().out
    assert "(a)  local disk, busybox initramfs" in out
    assert "(e4) QEMU curl, default readahead, 100 ms" in out
    results = {r["config"]["key"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    local, curl = results["a"]["runs"][0], results["e4"]["runs"][0]
    assert local["seconds"] > 0 and curl["seconds"] > 0
    # The guest really read its disk, and the remote one really went through the proxy.
    assert local["read_bytes"] > 1_000_000
    assert curl["wire_bytes"] >= local["read_bytes"]
    assert (tmp_path / "table.txt").read_text().strip() in out
    assert (tmp_path / "logs" / "e4-0.log").read_text().count("SEEDBOOT-BENCH-DONE") == 1


@pytest.mark.qemu
def test_icount_times_the_guest_by_its_own_clock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = str(artifacts.kernel_dir())
    argv = ["--smoke", "--icount", "--only", "a", "--no-plots", "--out", str(tmp_path), "--kernel", kernel]
    assert boot.main(argv) == 0
    out = capsys.readouterr().out
    assert "guest time at the marker under -icount" in out
    run = json.loads((tmp_path / "results.json").read_text())[0]["runs"][0]
    marker = next(x for x in (tmp_path / "logs" / "a-0.log").read_text().splitlines() if "BENCH-DONE" in x)
    # the time reported is the one the guest printed with its marker, not the host's
    assert run["seconds"] == float(marker.split("guest-uptime=")[1]) > 0
    # and a results directory printed again keeps saying which clock it used
    assert boot.main(["--table", str(tmp_path), "--no-plots"]) == 0
    assert "guest time at the marker under -icount" in capsys.readouterr().out


def test_stage_split_from_agent_lines() -> None:
    lines = [
        (1.0, "SeaBIOS"),
        (9.0, "[   4.50s] seedboot: agent 0.1.0 up at 4.40s (kernel ran /init at 2.00s)"),
        (9.5, "[   5.00s] seedboot: early     ok      0.50s  mounted /sys"),
        (12.5, "[   8.00s] seedboot: network   ok      3.00s  eth0 10.0.2.15/24 via DHCP"),
        (13.0, "[   8.50s] seedboot: root      FAILED  0.20s  no file system"),
        (14.0, "[   9.50s] seedboot: switch    ok      1.00s  exec /sbin/init"),
    ]
    split = seedboot_runs.stages(lines, marker_at=30.0)
    assert split == pytest.approx(
        {
            "firmware": 4.5,
            "kernel": 2.0,
            "agent start": 2.4,
            "early": 0.5,
            "network": 3.0,
            "switch": 1.0,
            "os": 16.0,
        }
    )
    assert seedboot_runs.stages([(1.0, "no agent here")], 5.0) == {}


def test_cpu_split_from_the_timing_line() -> None:
    line = (
        "[   7.91s] seedboot: timing: kernel ran /init at 2.02s, agent's first line at 2.67s, switch "
        "at 7.88s: agent 5.86s, of which waiting for link, DHCP and mirror probes 0.32s, block daemon "
        "start 1.09s; overhead (all but the waits) 5.54s; CPU since the first line: agent 1.45s, its "
        "commands 0.84s, block daemon 2.37s, kernel and the rest 0.30s, idle 0.00s"
    )
    assert seedboot_runs.cpu_split([(1.0, "SeaBIOS"), (10.8, line)]) == {
        "agent": 1.45,
        "commands": 0.84,
        "daemon": 2.37,
        "kernel": 0.30,
        "idle": 0.0,
    }
    assert seedboot_runs.cpu_split([(1.0, "no agent here")]) == {}
    # with the daemon's split by thread (from its status, agent/stages/switch.py)
    by_thread = "block daemon 2.37s (verify 0.88, main 0.72, local-copy 0.14),"
    threaded = line.replace("block daemon 2.37s,", by_thread)
    assert seedboot_runs.cpu_split([(10.8, threaded)]) == {
        "agent": 1.45,
        "commands": 0.84,
        "daemon": 2.37,
        "kernel": 0.30,
        "idle": 0.0,
        "daemon:verify": 0.88,
        "daemon:main": 0.72,
        "daemon:local-copy": 0.14,
    }


@pytest.mark.root
def test_cache_partition_state_after_power_off_is_reported(tmp_path: Path) -> None:
    """(d)'s cache disk, read after the guest powered off: clean when the agent's shutdown unit
    remounted it read-only, "journal to replay" when it was left mounted, as a power-off does."""
    img = tmp_path / "part.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img), "16M"], check=True)
    assert seedboot_runs.fs_state(img) == "clean"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        (mnt / "block").write_bytes(b"x" * 4096)
        os.sync()
        assert seedboot_runs.fs_state(img) == "journal to replay"
        # the disk as a power-off leaves it, read as its next mount would (the traces' reader)
        copy = tmp_path / "copy.ext4"
        shutil.copyfile(img, copy)
        diskimage.replay_journal(copy)
        assert seedboot_runs.fs_state(copy) == "clean"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert seedboot_runs.fs_state(img) == "clean"
    assert seedboot_runs.fs_state(tmp_path / "missing.img") == "unreadable"
    d = next(c for c in boot.configs(0.1) if c.key == "d")
    row = boot.Row(d, [boot.Run(20.0, cache_after="clean"), boot.Run(21.0, cache_after="journal to replay")])
    assert "  (d) left its cache partition, after the power-off: clean 1 of 2, journal to replay 1 of 2" in (
        boot.stage_lines([row])
    )
