"""The boot benchmark's smoke mode, so the harness cannot rot: a tiny busybox "OS" booted from
local disk (a) and through QEMU's curl driver behind the latency proxy (e4), one run each
(~30 s). It checks what a user reads in the table, never the times themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import boot
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
