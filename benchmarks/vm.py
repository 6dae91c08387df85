"""Boot one QEMU guest (software emulation, same settings for every configuration) and time it
from QEMU's start to the marker on its serial console.

Every console line is kept with its time since start (for the agent's stage split), and the
guest's own disk reads are taken from QEMU's block statistics (QMP ``query-blockstats``).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
MEMORY_MB = 1024
BASE_APPEND = "console=ttyS0 panic=-1 quiet"
# more kernel command line for every boot of a run (boot.py --append), for diagnosis
EXTRA_APPEND = ""
# Every guest has this NIC (issue 7: the same QEMU settings), also the local disk's and the
# peers', which do not use it: a Debian guest's udev and drivers spend ~0.35 s of guest time on
# it (configuration a0 against a, -icount). Only (f), the boot with the network gone, and a0
# have none.
NIC = ["-nic", "user,model=virtio-net-pci"]
# -icount: the guest's clock counts instructions (2^2 ns each) instead of following the host's,
# and runs in real time while the guest idles (sleep=on). A boot's guest time then measures the
# work it did, and another job on this shared host no longer changes it (±0.5 s where wall
# times swing by ±3 s): the mode for comparing changes to the agent.
ICOUNT = ["-icount", "shift=2,sleep=on"]
# What the benchmark's marker line carries: "SEEDBOOT-BENCH-DONE guest-uptime=27.81"
GUEST_UPTIME = re.compile(r"guest-uptime=([0-9.]+)")


@dataclass
class Boot:
    """One boot: what was run, when the marker came, what the console said."""

    seconds: float | None
    lines: list[tuple[float, str]] = field(default_factory=list)
    guest_seconds: float | None = None  # the guest's own uptime at the marker, if it said
    read_bytes: int = 0
    read_ops: int = 0
    exit_code: int | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.seconds is not None


def qmp(sock_path: Path, command: str) -> dict[str, object]:
    """One QMP command's ``return`` value (events in between are skipped)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        f.readline()  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        result = reply.get("return", {})
        return {"return": result}


def read_stats(sock_path: Path) -> tuple[int, int]:
    """Bytes and read operations the guest issued to its disks."""
    try:
        reply = qmp(sock_path, "query-blockstats")["return"]
    except (OSError, ValueError) as e:
        log.warning("no block statistics from QEMU: %s", e)
        return 0, 0
    total_bytes = total_ops = 0
    for dev in reply if isinstance(reply, list) else []:
        stats = dev.get("stats", {})
        total_bytes += int(stats.get("rd_bytes", 0))
        total_ops += int(stats.get("rd_operations", 0))
    return total_bytes, total_ops


def boot(
    kernel: Path,
    initrd: Path,
    append: str,
    extra: list[str],
    marker: str,
    log_path: Path,
    timeout: float = 600.0,
    wait_poweroff: float = 0.0,
    on_line: Callable[[float, str], None] | None = None,
    icount: bool = False,
) -> Boot:
    """Boot and wait for MARKER; ``wait_poweroff`` seconds then let the guest shut down cleanly
    (needed when the boot writes a cache that the next boot reads)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sock_path = log_path.with_suffix(".qmp")
    sock_path.unlink(missing_ok=True)
    cmd = [
        QEMU,
        "-accel",
        "tcg",
        *(ICOUNT if icount else []),
        "-smp",
        "1",
        "-m",
        str(MEMORY_MB),
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-qmp",
        f"unix:{sock_path},server=on,wait=off",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"{BASE_APPEND} {append} {EXTRA_APPEND}".strip(),
        *extra,
    ]
    log.info("$ %s", " ".join(cmd))
    result = Boot(seconds=None)
    seen = threading.Event()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Written as lines arrive, so a slow or stuck boot can be watched with tail -f.
    console = open(log_path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            t = time.monotonic() - start
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            result.lines.append((t, line))
            console.write(f"[{t:8.3f}] {line}\n")
            if on_line is not None:
                on_line(t, line)
            if marker in line and result.seconds is None:
                result.seconds = t
                m = GUEST_UPTIME.search(line)
                result.guest_seconds = float(m.group(1)) if m else None
                seen.set()
        seen.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        if not seen.wait(timeout):
            result.error = f"no marker after {timeout:.0f} s"
        elif result.seconds is None:
            result.error = "QEMU exited before the marker"
        else:
            result.read_bytes, result.read_ops = read_stats(sock_path)
            if wait_poweroff:
                try:
                    proc.wait(wait_poweroff)
                except subprocess.TimeoutExpired:
                    log.warning("guest did not power off within %.0f s", wait_poweroff)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        thread.join(5)
        result.exit_code = proc.returncode
        sock_path.unlink(missing_ok=True)
        console.close()
    if result.error:
        tail = " / ".join(line for _, line in result.lines[-3:])
        result.error += f" (console: {tail}; full log {log_path})"
    return result
