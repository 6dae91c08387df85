"""/proc/PID/stat, read the one way that survives any command name."""

from __future__ import annotations

import os
from pathlib import Path

FIRST_FIELD = 3  # stat_fields()[0] is proc(5)'s field 3, the state


def stat_fields(path: str | Path) -> list[str]:
    """The fields of a /proc/PID/stat (or /proc/PID/task/TID/stat) file from the state on:
    field N of proc(5) is at [N - 3]. The command (field 2) may hold spaces and parentheses,
    so the split comes after its last ')'. OSError if the process is gone."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def cpu_seconds(path: str | Path) -> float:
    """User plus system CPU time of that process or thread (fields 14 and 15)."""
    f = stat_fields(path)
    return (int(f[14 - FIRST_FIELD]) + int(f[15 - FIRST_FIELD])) / os.sysconf("SC_CLK_TCK")
