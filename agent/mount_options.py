"""The block daemon's options, and the ``mount`` command line that carries them.

Apart from ``seedboot.agent.daemon`` so that PID 1 (the blockdev stage) can write the command
line without importing the daemon's modules (cache, fetcher, FUSE...: ~0.15 s under emulation)
that the daemon process itself loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MountOptions:
    mountpoint: Path
    name: str
    pubkeys: list[Path]
    cache: Path
    mirrors: list[str] = field(default_factory=list)
    version: int | None = None
    prefetch: str = "profile"
    # transfers in flight: on plain HTTP/1.1 one connection each. A cold sequential read at
    # 100 ms RTT (benchmarks/blockdev.py) ran at 115 MB/s with 64, 136-155 MB/s with 128.
    conns: int = 128
    offline: bool = False
    record: Path | None = None
    cache_max: int | None = None
    probe: bool = True
    cached_release: bool = False
    expiry_tolerance: int = 0
    log: Path | None = None
    argv0: str | None = None
    local_copy: bool = False
    # on SIGUSR1 (shutdown) also remount the cache's file system read-only (agent/quiesce.py):
    # the miniroot's own cache partition, never a host's file system
    quiesce_remount: bool = False

    def to_argv(self) -> list[str]:
        """The mount subcommand's arguments that reproduce these options."""
        a = ["mount", "--name", self.name, "--cache", str(self.cache), "--prefetch", self.prefetch]
        for m in self.mirrors:
            a += ["--mirror", m]
        for k in self.pubkeys:
            a += ["--pubkey", str(k)]
        a += ["--conns", str(self.conns), "--expiry-tolerance", str(self.expiry_tolerance)]
        if self.version is not None:
            a += ["--version", str(self.version)]
        if self.offline:
            a.append("--offline")
        if self.record is not None:
            a += ["--record", str(self.record)]
        if self.cache_max is not None:
            a += ["--cache-max", str(self.cache_max)]
        if not self.probe:
            a.append("--no-probe")
        if self.cached_release:
            a.append("--cached-release")
        if self.log is not None:
            a += ["--log", str(self.log)]
        if self.argv0 is not None:
            a += ["--argv0", self.argv0]
        if self.local_copy:
            a.append("--local-copy")
        if self.quiesce_remount:
            a.append("--quiesce-remount")
        return [*a, str(self.mountpoint)]
