"""Leaving the cache partition clean when the machine shuts down.

The block daemon outlives the booted system's shutdown (systemd spares ``@`` processes), and
the cache partition is mounted in the miniroot, out of the booted system's sight: nothing
unmounted it at power-off, so every next boot's mount replayed its journal first (0.3 s under
emulation, on the offline boot's path). Now the booted system tells the daemon, late in its
shutdown, with SIGUSR1 (``unit_text``: a systemd unit the switch stage leaves in /run). The
daemon then writes the boot's trace, stops writing blocks and the local copy (a batch being
written is finished), and with ``--quiesce-remount`` remounts the cache's file system read-only,
which flushes the journal and marks it clean. It goes on serving reads: blocks fetched from
then on are served, not kept. ``progress.json`` says ``"quiesced": true`` once that is done.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from seedboot.agent.blockdev import Recorder
    from seedboot.agent.cache import BatchWriter, BlockCache
    from seedboot.agent.localcopy import LocalCopy

log = logging.getLogger(__name__)

UNIT = "seedboot-cache.service"
SCRIPT = "quiesce"  # in /run/seedboot: the same hand-off for other inits
STOP_WAIT = 20.0  # seconds the unit's ExecStop waits for the daemon
DRAIN_WAIT = 5.0  # seconds for the fetched blocks queued for the cache (a batch or two)
BUSY_RETRY_EVERY = 0.5  # seconds between remount tries while a writer holds the partition
BUSY_RETRY_FOR = 300.0
_once = threading.Lock()  # a second SIGUSR1 while the first is handled does nothing


@dataclass
class Quiesced:
    """What SIGUSR1 did, for status.json (``done`` goes to progress.json too)."""

    done: bool = False
    at: float = 0.0
    cache: str = ""  # "read-only", or why the file system stayed writable
    steps: list[str] = field(default_factory=list)


def _remount_ro(path: Path) -> int:
    """0, or the errno of remounting the file system at ``path`` read-only."""
    from seedboot.agent.stages import syscalls as sc

    try:
        sc.mount("none", str(path), None, sc.MS_REMOUNT | sc.MS_RDONLY)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


def _why(path: Path, e: int) -> str:
    busy = " (a file on it is still open for writing; trying again)" if e == errno.EBUSY else ""
    return f"remounting {path} read-only failed: {os.strerror(e)}{busy}"


def _retry_while_busy(state: Quiesced, path: Path) -> None:
    """A process of the booted system still has a file on the partition open for writing
    (it sees it at /run/seedboot/knxblock): try again until it is gone, at the latest when the
    system's last processes are killed (the daemon lives on to the power-off)."""
    deadline = time.monotonic() + BUSY_RETRY_FOR
    while time.monotonic() < deadline:
        time.sleep(BUSY_RETRY_EVERY)
        e = _remount_ro(path)
        if e == 0:
            state.cache = "read-only (once its last writer was gone)"
            log.info("cache %s: remounted read-only on a later try", path)
            return
        if e != errno.EBUSY:
            state.cache = _why(path, e)
            return
    log.info("cache %s: still busy after %.0f s; left writable", path, BUSY_RETRY_FOR)


def quiesce(
    state: Quiesced,
    cache: BlockCache,
    writer: BatchWriter,
    copy: LocalCopy | None,
    recorder: Recorder | None,
    remount: bool,
) -> None:
    """Write what is queued, stop every write to the cache, then (``remount``) make its file
    system read-only. The blocks fetched last are the ones an offline boot would miss."""
    if not _once.acquire(blocking=False):
        return  # a second signal: the first one is under way or done
    state.at = time.time()
    why = "the machine is shutting down (SIGUSR1)"
    if recorder is not None:
        recorder.stop()
        state.steps.append("trace written")
    if copy is not None:
        copy.freeze(why)
        state.steps.append("local copy written and closed")
    if not writer.drain(DRAIN_WAIT):
        state.steps.append(f"blocks still queued after {DRAIN_WAIT:.0f} s dropped")
    cache.freeze(why)
    state.steps.append("block writes stopped")
    if remount and not os.path.ismount(cache.root):
        state.cache = f"{cache.root} is not a mount point: not remounted"
    elif remount:
        os.sync()  # a remount that fails (busy) still leaves the data on disk
        e = _remount_ro(cache.root)
        state.cache = _why(cache.root, e) if e else "read-only"
        if e == errno.EBUSY:
            threading.Thread(target=_retry_while_busy, args=(state, cache.root), daemon=True).start()
    else:
        os.sync()
        state.cache = "synced (not remounted: no --quiesce-remount)"
    state.done = True
    log.info("quiesced in %.2f s: %s; cache %s", time.time() - state.at, ", ".join(state.steps), state.cache)


def stop_command(pid: int, progress: Path) -> str:
    """The shell command that hands the daemon the shutdown: SIGUSR1, then a bounded wait
    until ``progress`` says it is done (the pattern's dots stand for the JSON's quotes)."""
    polls = int(STOP_WAIT * 10)
    done = f"grep -qs quiesced.:.true {progress}"
    wait = f"i=0; while [ $i -lt {polls} ] && ! {done}; do sleep 0.1; i=$((i+1)); done"
    return f"kill -USR1 {pid} || exit 0; {wait}"


def install_script(path: Path, pid: int, progress: Path) -> None:
    """The same command as an executable for any other init's shutdown (OpenRC, sysvinit, a
    hand-written /sbin/init) to run before it powers off: /run/seedboot/quiesce."""
    text = f"#!/bin/sh\n# Written by the seedboot miniroot: what {UNIT} does on systemd\n"
    path.write_text(text + stop_command(pid, progress) + "\n")
    path.chmod(0o755)


def unit_text(pid: int, progress: Path) -> str:
    """A systemd unit for the booted system: active from early boot on, stopped late in the
    shutdown (it is ordered before sysinit.target, so it stops after the services), when its
    ExecStop runs ``stop_command``. ``$$`` is a literal ``$`` to systemd."""
    stop = stop_command(pid, progress).replace("$", "$$")
    return f"""# Written by the seedboot miniroot: its block daemon (pid {pid}) serves this system's
# root file system and keeps the cache partition mounted; this stops its writes at shutdown.
[Unit]
Description=seedboot: leave the block cache clean at shutdown
DefaultDependencies=no
Before=sysinit.target shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStop=/bin/sh -c '{stop}'
TimeoutStopSec={STOP_WAIT + 5:.0f}
"""


def install_unit(run: Path, pid: int, progress: Path) -> str:
    """Put the unit in ``run``/systemd/system (the booted system's /run) and enable it for
    this boot; returns a note for the console line."""
    units = run / "systemd" / "system"
    wants = units / "sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (units / UNIT).write_text(unit_text(pid, progress))
    link = wants / UNIT
    if not link.is_symlink():
        link.symlink_to(f"../{UNIT}")
    log.info("installed %s: SIGUSR1 to %d at shutdown", units / UNIT, pid)
    return f"{UNIT} leaves the cache clean at shutdown"
