"""The boot stages, in order, and the context they pass along.

Each stage is a module with ``run(ctx: Context) -> str``: it does its work, records what it
decided in the context and returns the detail for its console line. A stage fails by raising
``SeedError`` (message + hint); ``stages.runner`` prints it and ends in the rescue
action. Stage modules import what they need inside ``run`` so PID 1 only pays for the stages
it reaches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from seedboot.agent.cmdline import STAGE_NAMES, Cmdline
from seedboot.agent.console import Console

if TYPE_CHECKING:
    from seedboot.agent.release import Release
    from seedboot.agent.stages.blockdev import Prewarmed
    from seedboot.agent.stages.hardware import Coldplug
    from seedboot.agent.verity import TreeFetch

__all__ = ["STAGE_NAMES", "Context", "NetInfo", "Paths"]


@dataclass(frozen=True)
class Paths:
    """Where the agent puts things; tests point these into a tmp directory."""

    run: Path = Path("/run/seedboot")
    keys: Path = Path("/etc/seedboot/keys")
    hooks: Path = Path("/etc/seedboot/hooks")
    cache: Path = Path("/knxblock")
    newroot: Path = Path("/newroot")  # not under /run: /run is bound into it
    agent: Path = Path("/run/seedboot/seedboot-agent")
    modprobe: str = "/sbin/modprobe"
    shell: str = "/bin/sh"

    @property
    def mountpoint(self) -> Path:
        """The FUSE mount that holds disk.img."""
        return self.run / "blockdev"

    @property
    def lower(self) -> Path:
        return self.run / "lower"

    @property
    def blockdev_log(self) -> Path:
        return self.run / "blockdev.log"

    @property
    def agent_log(self) -> Path:
        return self.run / "agent.log"


@dataclass
class NetInfo:
    iface: str
    address: str  # CIDR
    gateway: str | None
    dns: list[str]
    how: str  # "DHCP" or "static"
    lease: int | None = None
    hostname: str | None = None
    domain: str | None = None


@dataclass
class Context:
    cmdline: Cmdline
    console: Console
    paths: Paths = field(default_factory=Paths)
    started: float = field(default_factory=time.monotonic)
    nics: list[str] = field(default_factory=list)
    disks: list[str] = field(default_factory=list)
    net: NetInfo | None = None
    cache_dev: str | None = None
    cache_kind: str = ""  # "disk" or "ram"
    mirrors: list[str] = field(default_factory=list)  # ranked, best first
    mirror_errors: dict[str, str] = field(default_factory=dict)
    latest: dict[str, int] = field(default_factory=dict)  # mirror -> its NAME/latest, as probed
    mirror: str | None = None
    release: Release | None = None
    clock_note: str = ""
    trace: Path | None = None
    daemon_pid: int | None = None
    prewarmed: Prewarmed | None = None  # the block daemon's process, started early
    coldplug: Coldplug | None = None  # storage drivers may still be loading in the background
    verity_fetch: TreeFetch | None = None  # the dm-verity tree, fetched while the daemon starts
    loopdev: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def hook_env(self, stage: str) -> dict[str, str]:
        env = {
            "SEED_STAGE": stage,
            "SEED_NEWROOT": str(self.paths.newroot),
            "SEED_CACHE": str(self.paths.cache),
            "SEED_CACHE_KIND": self.cache_kind,
            "SEED_MIRROR": self.mirror or "",
            "SEED_MIRRORS": " ".join(self.mirrors),
            "SEED_NAME": self.cmdline.name or "",
            "SEED_VERSION": str(self.release.meta.version) if self.release else "",
            "SEED_OFFLINE": "1" if self.cmdline.offline else "",
            "SEED_OVERLAY": self.cmdline.overlay,
            "SEED_RUN": str(self.paths.run),
            "SEED_CMDLINE": self.cmdline.raw,
        }
        if self.net:
            env.update(
                SEED_IFACE=self.net.iface,
                SEED_IP=self.net.address,
                SEED_GATEWAY=self.net.gateway or "",
                SEED_DNS=" ".join(self.net.dns),
                SEED_HOSTNAME=self.net.hostname or "",
                SEED_DOMAIN=self.net.domain or "",
            )
        return env
