"""Boot a seed disk in QEMU through its own GRUB (no -kernel), with a hypervisor's usual hardware.

The serial console is QEMU's stdio: a reader thread keeps every byte in a log file, hands each
line (escape codes stripped) to an optional callback, and ``expect()`` waits for a pattern;
``send()`` types into GRUB or a shell. Used by the hypervisor matrix test and by the demo.
Software emulation here (no KVM): -smp 1 and little memory keep several guests possible.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from seedboot.agent.errors import SeedError
from seedboot.tools.diskformats import FORMATS, Hardware

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r")


def plain(text: str) -> str:
    """Console text without terminal escape codes (GRUB draws its menu with them)."""
    return _ANSI.sub("", text)


class BootError(SeedError):
    """A pattern did not appear on the console in time, or the machine stopped first."""


@dataclass
class Machine:
    disk: Path
    hardware: Hardware
    log: Path
    uefi: bool = False
    network: bool = True
    memory: int = 512  # GRUB 2.06 on OVMF runs out of memory loading the kernel with 256
    watchdog: float = 1200.0
    on_line: Callable[[str], None] | None = None
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    _buf: bytearray = field(default_factory=bytearray)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reader: threading.Thread | None = None
    _timer: threading.Timer | None = None

    def command(self) -> list[str]:
        fmt = FORMATS[self.hardware.format].qemu_format
        machine = "q35" if self.uefi else self.hardware.machine
        cmd = ["qemu-system-x86_64", "-machine", f"{machine},accel=tcg", "-m", str(self.memory),
               "-smp", "1", "-display", "none", "-vga", "std", "-serial", "stdio", "-monitor", "none",
               "-no-reboot"]  # fmt: skip
        if self.uefi:
            vars_copy = self.log.parent / f"{self.log.stem}.OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_copy)
            cmd += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}"]
            cmd += ["-drive", f"if=pflash,format=raw,file={vars_copy}"]
        cmd += ["-drive", f"file={self.disk},format={fmt},if=none,id=seed,cache=unsafe"]
        cmd += list(self.hardware.disk)
        if self.network:
            cmd += ["-netdev", "user,id=n0", "-device", f"{self.hardware.nic},netdev=n0"]
        else:
            cmd += ["-nic", "none"]
        return cmd + self.extra

    def start(self) -> Machine:
        if shutil.which("qemu-system-x86_64") is None:
            raise SeedError("qemu-system-x86_64 is not installed", "run scripts/setup")
        if self.uefi and not OVMF_CODE.is_file():
            raise SeedError(f"no UEFI firmware at {OVMF_CODE}", "run scripts/setup (package ovmf)")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        (self.log.parent / f"{self.log.name}.cmd").write_text(shlex.join(cmd) + "\n")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._timer = threading.Timer(self.watchdog, self.kill)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        pending = b""
        with open(self.log, "wb") as logf:
            while True:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                logf.write(chunk)
                logf.flush()
                with self._lock:
                    self._buf += chunk
                if self.on_line is not None:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for ln in lines:
                        text = plain(ln.decode("utf-8", "replace")).strip()
                        if text:
                            self.on_line(text)

    def console(self) -> str:
        with self._lock:
            return plain(bytes(self._buf).decode("utf-8", "replace"))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def expect(self, pattern: str, timeout: float = 300.0, since: int = 0) -> re.Match[str]:
        """Wait for PATTERN (a regex) in the console from offset SINCE; raise with the console's tail."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console(), since)
            if m:
                return m
            if not self.running():
                if self._reader is not None:
                    self._reader.join(5)
                m = rx.search(self.console(), since)
                if m:
                    return m
                raise BootError(
                    self._why(pattern, f"QEMU exited (status {self.proc and self.proc.returncode})")
                )
            if time.monotonic() > deadline:
                raise BootError(self._why(pattern, f"not seen within {timeout:.0f} s"))
            time.sleep(0.2)

    def send(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float = 120.0) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BootError(self._why("power off", f"still running after {timeout:.0f} s")) from None
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.console().splitlines()[-n:])

    def _why(self, pattern: str, what: str) -> str:
        return f"{pattern!r} {what} ({self.hardware.describe()}, log {self.log}); last lines:\n{self.tail()}"

    def __enter__(self) -> Machine:
        return self.start() if self.proc is None else self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
