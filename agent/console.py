"""What the person at the console sees: one line per stage, with its time.

    [  3.41s] seedboot: network   ok     0.82s  eth0 10.0.2.15/24 via DHCP (lease 86400s)
    [ 25.10s] seedboot: mirror    FAILED 20.01s  no mirror reachable: http://a: timeout
    [ 25.10s]           hint: check seed.mirrors= and the network

The bracket is the time since the kernel started (``/proc/uptime``), so lines compare
with the kernel's own messages; the second time is the stage's duration. Lines go to
``/dev/console`` (the serial console in the QEMU tests) and to the agent's log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import TextIO

UPTIME = "/proc/uptime"


def uptime(path: str = UPTIME) -> float:
    """Seconds since the kernel started; falls back to the monotonic clock without /proc."""
    try:
        with open(path, "rb") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def stage_line(at: float, stage: str, status: str, took: float, detail: str) -> str:
    return f"[{at:7.2f}s] seedboot: {stage:<9} {status:<6} {took:5.2f}s  {detail}".rstrip()


def note_line(at: float, text: str) -> str:
    return f"[{at:7.2f}s] seedboot: {text}"


ACTIVE = "/sys/class/tty/console/active"


def active_consoles(path: str = ACTIVE) -> list[str]:
    """The kernel's consoles (``console=tty0 console=ttyS0`` gives ["tty0", "ttyS0"])."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().split()
    except OSError:
        return []


class Console:
    """Writes console lines; ``out`` is /dev/console in the miniroot, any stream in tests.

    /dev/console is only the last ``console=`` device; ``use_all_consoles`` adds the others
    (a GRUB entry with ``console=tty0 console=ttyS0`` shows the lines on screen and serial)."""

    def __init__(self, out: TextIO | None = None, logfile: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self.logfile = logfile
        self.extra: list[TextIO] = []

    def use_all_consoles(self, dev: str = "/dev") -> list[str]:
        names = active_consoles()
        # The last console= is /dev/console (our stdout) already: open only the others.
        for name in names[:-1]:
            try:
                self.extra.append(open(f"{dev}/{name}", "w", buffering=1, encoding="utf-8", errors="replace"))  # noqa: SIM115
            except OSError:
                continue
        return names

    def write(self, line: str) -> None:
        for stream in (self.out, *self.extra, self.logfile):
            if stream is None:
                continue
            try:
                stream.write(line + "\n")
                stream.flush()
            except OSError:
                pass

    def note(self, text: str) -> None:
        self.write(note_line(uptime(), text))

    def stage(self, stage: str, status: str, took: float, detail: str) -> None:
        self.write(stage_line(uptime(), stage, status, took, detail))

    def failure(self, stage: str, took: float, message: str, hint: str) -> None:
        at = uptime()
        self.write(stage_line(at, stage, "FAILED", took, message))
        if hint:
            self.write(f"[{at:7.2f}s]           hint: {hint}")

    def waiting(self, what: str, limit: float) -> None:
        """Every bounded wait says what it waits for, and for how long at most."""
        self.note(f"waiting up to {limit:.0f}s for {what}")


class ConsoleHandler(logging.Handler):
    """Routes ``logging`` records to the console (everything under seed.debug, else warnings)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.console.write(
                note_line(uptime(), f"{record.name.rsplit('.', 1)[-1]}: {record.getMessage()}")
            )


def setup_logging(console: Console, debug: bool, logfile: str | None = None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler = ConsoleHandler(console)
    handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    root.addHandler(handler)
    if logfile:
        try:
            os.makedirs(os.path.dirname(logfile), exist_ok=True)
            fh = logging.FileHandler(logfile)
        except OSError:
            return
        fh.setFormatter(logging.Formatter("%(relativeCreated)8.0fms %(name)s: %(message)s"))
        fh.setLevel(logging.DEBUG)
        root.addHandler(fh)
