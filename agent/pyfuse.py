"""pyfuse3 in its asyncio mode, loaded without trio.

The block daemon runs pyfuse3 on asyncio (``pyfuse3.asyncio``), not on trio: under emulation,
importing trio (with attrs, outcome and sortedcontainers) made the daemon's start, which is on
the boot's critical path, ~0.3 s longer than importing asyncio (0.43 s against 0.14 s under
qemu-user), and serving a read costs the same on either (about 45 µs on the host). pyfuse3
imports trio when it loads, though it never uses it in asyncio mode: an empty module stands in.
"""

import sys
import types

if "trio" not in sys.modules:
    sys.modules["trio"] = types.ModuleType("trio", "seedboot: pyfuse3 imports it; asyncio mode never uses it")

import pyfuse3  # after the stand-in
import pyfuse3.asyncio

pyfuse3.asyncio.enable()

__all__ = ["pyfuse3"]
