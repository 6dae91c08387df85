"""The block daemon's early process (agent/prewarm.py), forked for real from this process: the
name systemd sees, the imports it does while PID 1 goes on, and its clean end when the boot
never hands it a command line. The QEMU boot test checks the same from inside a booted OS."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from seedboot.agent.prewarm import fork_daemon


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_forked_daemon_is_a_storage_daemon_and_ends_without_a_command_line(tmp_path: Path) -> None:
    opts_r, opts_w = os.pipe()
    log = tmp_path / "blockdev.log"
    child = fork_daemon("@seedboot-blockdev", opts_r, log, (opts_w,))
    os.close(opts_r)
    try:
        deadline = time.monotonic() + 30
        while not _cmdline(child.pid).startswith(b"@") and time.monotonic() < deadline:
            time.sleep(0.01)
        # what systemd reads to spare it at switch-root and shutdown: argv[0] starting with "@"
        assert _cmdline(child.pid).split(b"\0")[0] == b"@seedboot-blockdev"
        assert Path(f"/proc/{child.pid}/comm").read_text().strip() == "seedboot-blockd"  # 15 bytes at most
        assert os.getsid(child.pid) == child.pid, "its own session: a console's hangup is not its end"
        assert child.poll() is None, "it waits for its command line"
    finally:
        os.close(opts_w)  # the boot went another way: an empty command line
    assert child.wait() == 0
    text = log.read_text()
    assert "blockdev-wait: seedboot.agent.pyfuse imported" in text and "Traceback" not in text
    assert _cmdline(os.getpid()).split(b"\0")[0] != b"@seedboot-blockdev", "the parent keeps its name"


def test_offline_daemon_does_not_load_what_only_fetching_needs(tmp_path: Path) -> None:
    """seed.offline: nothing is fetched, so pycurl (libcurl and OpenSSL) is not loaded early."""
    logs = {}
    for offline in (False, True):
        opts_r, opts_w = os.pipe()
        log = tmp_path / f"blockdev-{offline}.log"
        child = fork_daemon("@seedboot-blockdev", opts_r, log, (opts_w,), offline=offline)
        os.close(opts_r)
        os.close(opts_w)
        assert child.wait() == 0
        logs[offline] = log.read_text()
    assert "blockdev-wait: pycurl imported" in logs[False]
    assert "pycurl" not in logs[True] and "blockdev-wait: seedboot.agent.pyfuse imported" in logs[True]


SHORT_ARGV = """
import ctypes, os
from seedboot.agent.prewarm import set_argv0
set_argv0("@seedboot-blockdev")
getenv = ctypes.CDLL(None).getenv
getenv.restype = ctypes.c_char_p
print(open("/proc/self/cmdline", "rb").read().split(b"\\0")[0].decode(), getenv(b"SEED_KEEP").decode())
"""


def test_a_name_longer_than_the_arguments_keeps_the_environment(tmp_path: Path) -> None:
    """PID 1's arguments are just "/init": the name runs on over the first environment string,
    and C code still finds the others (libcurl reads its proxy variables with getenv)."""
    (tmp_path / "s.py").write_text(SHORT_ARGV)
    # PYTHONEXECUTABLE: with argv[0] "p", Python finds its venv (and seedboot) from this instead
    env = {"A_FIRST": "x" * 24, "SEED_KEEP": "yes", "PYTHONEXECUTABLE": sys.executable}
    r = subprocess.run(
        ["p", "s.py"], executable=sys.executable, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["@seedboot-blockdev", "yes"]


def test_cpu_per_thread_counts_the_main_thread_of_a_process_forked_from_a_thread(tmp_path: Path) -> None:
    """The early daemon is forked from PID 1's main thread, but a fork from any other thread
    leaves ``threading.main_thread().native_id`` naming a thread the child does not have:
    ``seedboot status`` must still show the FUSE loop's CPU under "main"."""
    import json
    import threading

    from seedboot.agent.daemon import _thread_cpu

    out = tmp_path / "cpu.json"

    def fork_and_report() -> None:
        pid = os.fork()
        if pid == 0:
            try:
                sum(i * i for i in range(300_000))  # some CPU on the child's only thread
                out.write_text(json.dumps(_thread_cpu()))
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    t = threading.Thread(target=fork_and_report)
    t.start()
    t.join()
    threads = json.loads(out.read_text())
    assert "main" in threads, threads
