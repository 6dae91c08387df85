"""pyfuse3 in its asyncio mode, loaded without trio, with a cheaper wait for requests.

The block daemon runs pyfuse3 on asyncio (``pyfuse3.asyncio``), not on trio: under emulation,
importing trio (with attrs, outcome and sortedcontainers) made the daemon's start, which is on
the boot's critical path, ~0.3 s longer than importing asyncio (0.43 s against 0.14 s under
qemu-user), and serving a read costs the same on either (about 45 µs on the host). pyfuse3
imports trio when it loads, though it never uses it in asyncio mode: an empty module stands in.

Before each request pyfuse3 waits for /dev/fuse to be readable, and its asyncio layer does
that by registering the descriptor with the event loop and removing it again (two
``epoll_ctl`` calls, a future and its callbacks): a third of the main thread's time while a
file is read sequentially from a warm cache. While requests are queued (the kernel sends
several reads at once) a zero-timeout ``poll`` says so in one system call, and the wait only
yields to the loop once, so the other tasks (reads whose blocks just arrived) still run.
"""

import asyncio
import select
import sys
import types

if "trio" not in sys.modules:
    sys.modules["trio"] = types.ModuleType("trio", "seedboot: pyfuse3 imports it; asyncio mode never uses it")

import pyfuse3  # after the stand-in
import pyfuse3.asyncio

pyfuse3.asyncio.enable()

_wait_registered = pyfuse3.asyncio.wait_readable
_polls: dict[int, "select.poll"] = {}


async def _wait_readable(fd: int) -> None:
    p = _polls.get(fd)
    if p is None:
        p = _polls[fd] = select.poll()
        p.register(fd, select.POLLIN)
    if p.poll(0):
        await asyncio.sleep(0)
        return
    await _wait_registered(fd)


pyfuse3.asyncio.wait_readable = _wait_readable

__all__ = ["pyfuse3"]
