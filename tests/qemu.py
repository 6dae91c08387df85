"""The QEMU harness for every boot test: one guest, its serial console in a log, expect() on it.

Software emulation (TCG), -m 512, -smp 1, -no-reboot; the guest is always killed at the end and
a watchdog kills it when the test's time budget is spent. Use as a context manager::

    with Guest(kernel=k, initrd=i, append="seed.mirrors=http://10.0.2.2:8080/", log=tmp/"console.log") as g:
        g.expect(r"SEEDBOOT-DEMO-OK", timeout=120)

With user networking the guest reaches the host's loopback at 10.0.2.2.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

QEMU = "qemu-system-x86_64"


class GuestError(AssertionError):
    """A pattern did not show up (or the guest died first); the message ends with the console."""


@dataclass(frozen=True)
class Disk:
    path: Path
    bus: str = "virtio"  # virtio | ide | scsi (virtio-scsi) | ahci | nvme | none (just the -drive)
    fmt: str = "raw"
    snapshot: bool = False  # writes go to a temporary overlay (a read-only disk that still boots)
    serial: str = ""


@dataclass
class Guest:
    log: Path
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disks: list[Disk] = field(default_factory=list)
    nic: str | None = "virtio-net-pci"  # any QEMU NIC model; None: no network at all
    net: bool = True  # user-mode network behind the NIC (False: NIC without a link to anything)
    memory: int = 512
    # RDRAND seeds the kernel RNG at boot, as on real hypervisors (CONFIG_RANDOM_TRUST_CPU);
    # without it the first /dev/urandom read (Python's start) waits ~2 s for jitter entropy under TCG.
    cpu: str = "qemu64,+rdrand"
    watchdog: float = 600.0  # seconds before the guest is killed no matter what
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    _timer: threading.Timer | None = None

    def command(self) -> list[str]:
        cmd = [
            QEMU,
            "-machine",
            "accel=tcg",
            "-cpu",
            self.cpu,
            "-m",
            str(self.memory),
            "-smp",
            "1",
            "-nographic",
        ]
        cmd += ["-no-reboot", "-serial", f"file:{self.log}", "-monitor", "none", "-nodefaults"]
        cmd += ["-vga", "none"]
        if self.kernel is not None:
            cmd += ["-kernel", str(self.kernel)]
            # panic=-1 + -no-reboot: a kernel panic ends QEMU instead of hanging the test.
            append = f"console=ttyS0 panic=-1 {self.append}".strip()
            cmd += ["-append", append]
            if self.initrd is not None:
                cmd += ["-initrd", str(self.initrd)]
        scsi = False
        ahci = False
        for i, d in enumerate(self.disks):
            opts = f"file={d.path},format={d.fmt},if=none,id=d{i},cache=unsafe"
            if d.snapshot:
                opts += ",snapshot=on"
            cmd += ["-drive", opts]
            serial = f",serial={d.serial}" if d.serial else ""
            if d.bus == "virtio":
                cmd += ["-device", f"virtio-blk-pci,drive=d{i}{serial}"]
            elif d.bus == "ide":
                cmd += ["-device", f"ide-hd,drive=d{i}{serial}"]
            elif d.bus == "scsi":
                if not scsi:
                    cmd += ["-device", "virtio-scsi-pci,id=scsi0"]
                    scsi = True
                cmd += ["-device", f"scsi-hd,drive=d{i},bus=scsi0.0{serial}"]
            elif d.bus == "ahci":
                if not ahci:
                    cmd += ["-device", "ahci,id=ahci0"]
                    ahci = True
                cmd += ["-device", f"ide-hd,drive=d{i},bus=ahci0.{i}{serial}"]
            elif d.bus == "nvme":
                cmd += ["-device", f"nvme,drive=d{i},serial={d.serial or f'seed{i}'}"]
            elif d.bus != "none":
                raise ValueError(f"unknown disk bus {d.bus}")
        if self.nic is not None:
            if self.net:
                cmd += ["-netdev", "user,id=n0", "-device", f"{self.nic},netdev=n0"]
            else:
                cmd += ["-device", self.nic]
        return cmd + self.extra

    def start(self) -> Guest:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_bytes(b"")
        cmd = self.command()
        (self.log.parent / f"{self.log.name}.cmd").write_text(shlex.join(cmd) + "\n")
        self.started = time.monotonic()
        # QEMU's own messages go to a file: a pipe nobody reads could fill up and stall the guest.
        with self.qemu_log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self._timer = threading.Timer(self.watchdog, self.kill)
        self._timer.daemon = True
        self._timer.start()
        return self

    def kill(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Guest:
        return self.start() if self.proc is None else self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def console(self) -> str:
        return self.log.read_bytes().decode("utf-8", "replace") if self.log.exists() else ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.console().splitlines()[-n:])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def expect(self, pattern: str, timeout: float = 120.0, since: int = 0) -> re.Match[str]:
        """Wait for PATTERN (a regex, multiline) in the console after offset SINCE; fail with its tail."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console(), since)
            if m:
                return m
            if not self.running():
                # One last read: QEMU may have flushed the final lines as it exited.
                m = rx.search(self.console(), since)
                if m:
                    return m
                raise GuestError(self._why(pattern, f"QEMU exited ({self._exit()}) first"))
            if time.monotonic() > deadline:
                raise GuestError(self._why(pattern, f"not seen within {timeout:.0f}s"))
            time.sleep(0.2)

    def wait_exit(self, timeout: float = 120.0) -> int:
        """Wait for the guest to power off (QEMU exits); fail with the console if it does not."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(self._why("power off", f"still running after {timeout:.0f}s")) from None

    @property
    def qemu_log(self) -> Path:
        return self.log.parent / f"{self.log.name}.qemu"

    def _exit(self) -> str:
        assert self.proc is not None
        out = self.qemu_log.read_text(errors="replace").strip() if self.qemu_log.exists() else ""
        return f"status {self.proc.returncode}" + (f": {out[-500:]}" if out else "")

    def _why(self, pattern: str, what: str) -> str:
        return f"{pattern!r} {what} (log {self.log}); last console lines:\n{self.tail()}"


def kernel_seconds(console: str, pattern: str) -> float | None:
    """The printk timestamp of the first console line matching PATTERN (needs printk.time=1)."""
    rx = re.compile(pattern)
    for line in console.splitlines():
        if rx.search(line):
            m = re.match(r"\s*\[\s*(\d+\.\d+)\]", line)
            if m:
                return float(m.group(1))
    return None


@contextmanager
def swtpm_device(state: Path, sock: Path) -> Iterator[list[str]]:
    """A software TPM 2.0 (swtpm) keeping its state in STATE, for one guest boot: yields the
    QEMU arguments of a tpm-tis device on it, and stops it when the block ends."""
    sock.unlink(missing_ok=True)
    sw = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--ctrl", f"type=unixio,path={sock}", "--tpmstate", f"dir={state}",
         "--flags", "startup-clear"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        yield [
            "-chardev", f"socket,id=chrtpm,path={sock}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0",
        ]  # fmt: skip
    finally:
        sw.terminate()
        sw.wait(10)
