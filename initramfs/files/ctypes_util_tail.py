# --- appended by seedboot's freezer (initramfs/ctypes_util_tail.py) ---
# The frozen runtime has no ldconfig, gcc or ld for find_library() to ask, and pyudev finds
# libudev through it: look in the runtime's own lib/ first (sys.prefix is the runtime's home).
_seedboot_stock_find_library = globals()["find_library"]


def find_library(name: str) -> str | None:
    import os
    import sys

    libdir = os.path.join(sys.prefix, "lib")
    try:
        names = sorted(os.listdir(libdir))
    except OSError:
        names = []
    for n in names:
        if n.startswith(f"lib{name}.so"):
            return os.path.join(libdir, n)
    found: str | None = _seedboot_stock_find_library(name)
    return found
