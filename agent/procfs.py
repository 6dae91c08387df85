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


def machine_cpu(path: str | Path = "/proc/stat") -> tuple[float, float]:
    """Busy and idle CPU seconds of the whole machine since boot, all CPUs summed (iowait
    counts as idle: nothing ran)."""
    fields = Path(path).read_text().split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise OSError(f"{path}: no 'cpu' line")
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    v = [int(x) for x in fields[1:9]]
    idle = v[3] + v[4]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(v) - idle) / tick, idle / tick
