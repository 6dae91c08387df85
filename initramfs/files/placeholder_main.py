"""Stand-in for seedboot.agent.main, frozen only while agent/main.py does not exist.

It lets the build and the start-up cost be measured before the real stages land:
``init`` prints the uptime at its first line and powers off, ``selftest`` imports what the
agent needs at run time, ``--version`` prints the version.
"""

from __future__ import annotations

import os
import sys
import time


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def selftest() -> int:
    t = time.monotonic()
    import ctypes.util

    import netifaces
    import psutil
    import pycurl
    import pyfuse3
    import pyudev
    import trio
    import zstandard

    from seedboot.agent import signature

    mods = (netifaces, psutil, pycurl, pyfuse3, pyudev, trio, zstandard, signature)
    assert ctypes.util.find_library("udev"), "libudev not found"
    dt = time.monotonic() - t
    print(f"seedboot-agent selftest ok: {len(mods)} modules in {dt:.2f}s; {pycurl.version}")
    return 0


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--version"]:
        print("seedboot-agent placeholder")
        return 0
    if args[:1] == ["selftest"]:
        return selftest()
    if args[:1] == ["init"]:
        print(f"seedboot-agent: started at {uptime():.2f}s (placeholder, pid {os.getpid()})", flush=True)
        with open("/proc/cmdline") as f:
            want_selftest = "seed.placeholder.selftest" in f.read()
        if want_selftest:
            selftest()
            print(f"seedboot-agent: selftest done at {uptime():.2f}s", flush=True)
        os.execv("/bin/busybox", ["poweroff", "-f"])
    print("usage: seedboot-agent init|selftest|--version", file=sys.stderr)
    return 2
