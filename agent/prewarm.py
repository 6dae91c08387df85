"""The block daemon's process, forked from PID 1 at the start of the boot.

A fork, not an exec of the agent's binary: the child starts with the interpreter and every
module PID 1 has loaded so far already in memory (copy-on-write), where an exec would start
a second interpreter and import them again, about a second of the single vCPU under
emulation. It imports the daemon's own modules (``seedboot.agent.main.blockdev_wait``) at
nice 10 while PID 1 goes on, then waits for its mount command line.

PID 1 forks at the early stage, before any thread of its own exists, so no lock can be held
by a thread the child does not have. The child never returns into PID 1's code: whatever
happens, it ends with ``os._exit``.

systemd spares processes whose argv[0] begins with ``@`` at switch-root and shutdown
(its root-storage-daemon convention). An exec can choose argv[0]; a fork writes it over its
copy of the argument and environment strings, as setproctitle does, so /proc/PID/cmdline
reads ``@seedboot-blockdev``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from seedboot.agent.procfs import FIRST_FIELD, stat_fields

PR_SET_NAME = 15


@dataclass
class Child:
    """A forked process, with the few ``subprocess.Popen`` methods the blockdev stage uses."""

    pid: int
    returncode: int | None = None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped by someone else: gone all the same
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int:
        while (code := self._reap(0)) is None:
            pass
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def set_argv0(name: str) -> None:
    """Make /proc/self/cmdline read NAME (and comm its first 15 bytes, for ps and top).

    NAME goes over the argument strings; if it is longer (PID 1's are just "/init"), it runs
    on into the environment strings, which the kernel then reads up to NAME's NUL. Only the
    bytes it needs are overwritten: C code's getenv still finds the rest of the environment
    (Python's os.environ is a copy made at start)."""
    f = stat_fields("/proc/self/stat")
    arg_start, arg_end, env_end = (int(f[n - FIRST_FIELD]) for n in (48, 49, 51))  # proc(5)'s fields
    data = name.encode() + b"\0"
    if not arg_start or len(data) > env_end - arg_start:
        room = env_end - arg_start
        raise OSError(f"no room for argv[0] {name!r} ({room} bytes of arguments and environment)")
    ctypes.memmove(arg_start, data, len(data))
    if arg_end > arg_start + len(data):  # the old arguments after it: gone
        ctypes.memset(arg_start + len(data), 0, arg_end - arg_start - len(data))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.lstrip("@").encode()[:15], 0, 0, 0)


def fork_daemon(
    argv0: str, opts_r: int, log_path: Path, parent_fds: tuple[int, ...], offline: bool = False
) -> Child:
    """Fork the daemon: it logs to LOG_PATH and reads its command line from OPTS_R (an empty
    one ends it). PARENT_FDS are PID 1's ends of its pipes: the child closes them, or it would
    never see the end of its command line. OFFLINE: it will fetch nothing (fewer imports)."""
    logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child would write PID 1's buffered output a second time
    pid = os.fork()
    if pid == 0:
        _child(argv0, opts_r, logfd, parent_fds, offline)
    os.close(logfd)
    return Child(pid)


def _child(argv0: str, opts_r: int, logfd: int, parent_fds: tuple[int, ...], offline: bool) -> NoReturn:
    code = 70
    try:
        for fd in parent_fds:
            os.close(fd)
        os.setsid()
        os.chdir("/")
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(logfd)
        # PID 1's stream objects may not write to fds 1 and 2 (a test harness swaps them)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        # PID 1's handlers write to the console and the agent's log: not this process's
        logging.getLogger().handlers.clear()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        set_argv0(argv0)
        from seedboot.agent.main import blockdev_wait

        code = blockdev_wait(["--opts-fd", str(opts_r), *(["--offline"] if offline else [])])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
