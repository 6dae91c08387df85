"""seedboot's side of the boot benchmark: publish the workload, build the miniroot, make cache
disks, record and publish a boot profile, and parse the agent's stage lines.

Everything goes through the ``seedboot`` command as a user would run it. What the miniroot
needs that is not there yet (``seedboot mkinitramfs``) makes ``available()`` say why, and the
harness reports the seedboot rows as skipped instead of failing the peers' rows.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.workload import Workload
from seedboot.tools import diskimage

log = logging.getLogger(__name__)

NAME = "bench"
CACHE_LABEL = "KNXBLOCK"
CACHE_SIZE = "2G"
# Same order as the agent's stages; "kernel" is QEMU start to the first stage, "os" the switch
# to the marker.
STAGE_LINE = re.compile(r"seedboot: (\w+)\s+ok\s+([\d.]+)s")
# "[  9.41s] seedboot: agent 0.1.0 up at 9.39s (kernel ran /init at 4.44s)"
AGENT_UP = re.compile(r"\[\s*([\d.]+)s\] seedboot: agent \S+ up\b")
AGENT_READY = re.compile(r"(?:up|ready) at ([\d.]+)s")
AGENT_INIT = re.compile(r"init at ([\d.]+)s")
# The timing line's split of the CPU from the agent's first line to the switch (agent/stages/switch.py)
CPU_SPLIT = re.compile(
    r"CPU since the first line: agent ([\d.]+)s, its commands ([\d.]+)s, block daemon ([\d.]+)s"
    r"(?: \(([^)]*)\))?, kernel and the rest ([\d.]+)s, idle ([\d.]+)s"
)
CPU_KEYS = ("agent", "commands", "daemon", "kernel", "idle")
# the daemon's own split by thread, in parentheses after its figure: "(verify 0.88, fetcher 0.58)"
DAEMON_THREAD = re.compile(r"([\w-]+) ([\d.]+)")


def seedboot(*args: str) -> str:
    cmd = [sys.executable, "-m", "seedboot.tools.cli", *args]
    log.info("$ seedboot %s", " ".join(args))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"seedboot {args[0]} failed: {last[0]}")
    return p.stdout


def available() -> str:
    """Empty when seedboot can boot the workload here, else the reason it cannot."""
    from seedboot.tools import cli

    if "seedboot.tools.mkinitramfs_cmd" not in cli.COMMAND_MODULES and not any(
        "mkinitramfs" in m for m in cli.COMMAND_MODULES
    ):
        return "no `seedboot mkinitramfs` yet (the miniroot, issue 4)"
    return ""


@dataclass
class Setup:
    """What the seedboot rows boot: a mirror with the image published, the miniroot, a key."""

    mirror: Path
    initrd: Path
    pubkey: Path
    key: Path
    workdir: Path
    has_profile: bool = False
    block_size: str = ""  # publish --block-size ("" for publish's default)

    def append(self, mirror_url: str | None, *flags: str) -> str:
        mirrors = [f"seed.mirrors={mirror_url}"] if mirror_url else []
        return " ".join([*mirrors, f"seed.name={NAME}", "seed.rescue=reboot", *flags])


def _newer(target: Path, *sources: Path) -> bool:
    return target.exists() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources)


def miniroot_sources() -> list[Path]:
    """What the miniroot is built from: a change here means building it again."""
    repo = Path(__file__).resolve().parent.parent
    found = [p for d in ("agent", "initramfs", "hooks") for p in (repo / d).rglob("*") if p.is_file()]
    return (
        found + sorted((repo / "tools").glob("mkinitramfs*.py")) + sorted((repo / "tools").glob("freeze*.py"))
    )


def publish_sources() -> list[Path]:
    """What the mirror tree is made by: a change here means publishing again (a new file in the
    tree, such as the dm-verity tree's .zst, or a new metadata field)."""
    repo = Path(__file__).resolve().parent.parent
    tools = [repo / "tools" / n for n in ("publish.py", "publish_cmd.py", "verity.py")]
    agent = [repo / "agent" / n for n in ("metadata.py", "index.py", "blocks.py", "layout.py")]
    return [p for p in tools + agent if p.exists()]


def mirror_dir(build: Path) -> Path:
    return build / "seedboot" / "mirror"


def prepare(work: Workload, build: Path, block_size: str = "") -> Setup:
    """Publish the image (once per image, publisher or block size change) and build the
    miniroot (once per source change)."""
    d = build / "seedboot"
    d.mkdir(parents=True, exist_ok=True)
    key, pub = d / "bench.key", d / "bench.pub"
    if not key.exists():
        seedboot("keygen", "--out", str(d / "bench"))
    mirror = mirror_dir(build)
    stamp = d / "published"
    sized = ["--block-size", block_size] if block_size else []
    fresh = _newer(stamp, work.image, key, *publish_sources())
    if not fresh or stamp.read_text().strip() != (block_size or "1"):
        if mirror.exists():
            shutil.rmtree(mirror)
        seedboot(
            "publish", str(work.image), "--mirror", str(mirror), "--name", NAME, "--key", str(key), *sized
        )
        stamp.write_text(f"{block_size or 1}\n")
    initrd = d / "miniroot.img"
    if not _newer(initrd, pub, work.kernel.vmlinuz, *miniroot_sources()):
        seedboot("mkinitramfs", "--kernel", str(work.kernel.root), "--pubkey", str(pub), "--out", str(initrd))
    return Setup(mirror=mirror, initrd=initrd, pubkey=pub, key=key, workdir=d, block_size=block_size)


# The update (u) boots: a systemd and libc upgrade, its files rewritten as dpkg does (a new file
# renamed over the old one), so their data lands in other blocks, and os-release edited; published
# with the last version's profile carried over through the files (publish --carry-profile).
UPDATED_FILES = (
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-252.so",
    "usr/lib/x86_64-linux-gnu/systemd/libsystemd-core-252.so",
    "usr/lib/systemd/systemd",
    "usr/bin/udevadm",
)


def update_mirror(setup: Setup, image: Path) -> Path:
    """A mirror with everything in setup.mirror and, as its newest version, IMAGE with the
    update above applied, its profile carried over from the last version's (once per publish
    or profile)."""
    d = setup.workdir / "update"
    mirror, stamp = d / "mirror", d / "published"
    profile = setup.workdir / "boot.profile"
    if _newer(stamp, setup.workdir / "published", profile) and stamp.read_text() == "carried\n":
        return mirror
    log.info("publishing the update (u) boots: %s", ", ".join(UPDATED_FILES))
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    updated, mnt = d / "disk.img", d / "mnt"
    subprocess.run(["cp", "--sparse=always", str(image), str(updated)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(updated), str(mnt)], check=True)
    try:
        for rel in UPDATED_FILES:
            old = mnt / rel
            new = old.with_name(old.name + ".dpkg-new")
            shutil.copy2(old, new)
            os.replace(new, old)
        release = mnt / "usr/lib/os-release"
        release.write_text(release.read_text() + "SEEDBOOT_BENCH_UPDATE=1\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    # publishing writes every file anew (write, then rename): the links leave setup.mirror as it is
    shutil.copytree(setup.mirror, mirror, copy_function=os.link)
    sized = ["--block-size", setup.block_size] if setup.block_size else []
    out = seedboot("publish", str(updated), "--mirror", str(mirror), "--name", NAME, "--key",
                   str(setup.key), "--carry-profile", *sized)  # fmt: skip
    log.info("%s", out.strip())
    updated.unlink()
    stamp.write_text("carried\n")
    return mirror


def cache_disk(path: Path, copy_of: Path | None = None) -> Path:
    """An empty ext4 cache disk labelled KNXBLOCK, or a sparse copy of a filled one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    if copy_of is not None:
        subprocess.run(["cp", "--sparse=always", str(copy_of), str(path)], check=True)
        return path
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", CACHE_LABEL, str(path), CACHE_SIZE],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    return path


def fs_state(image: Path) -> str:
    """How an ext4 image's superblock says it was left: "clean", or "journal to replay" when
    it was not unmounted (or remounted read-only) before the power-off."""
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    state = fields.get("Filesystem state", "").strip()
    if not state:
        return "unreadable"
    if "needs_recovery" in fields.get("Filesystem features", ""):
        return "journal to replay"
    return state


def cache_drive(path: Path) -> list[str]:
    return ["-drive", f"file={path},format=raw,if=virtio"]


def extract_traces(cache: Path, dest: Path) -> list[Path]:
    """Copy the boot traces the agent wrote on a cache disk (debugfs: no mount needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    diskimage.replay_journal(cache)  # a trace written just before the power-off
    listing = subprocess.run(
        ["debugfs", "-R", "ls -p /traces", str(cache)], capture_output=True, text=True, check=False
    ).stdout
    out = []
    for line in listing.splitlines():
        parts = line.strip("/").split("/")
        if len(parts) >= 5 and parts[4].endswith(".trace"):
            target = dest / parts[4]
            subprocess.run(
                ["debugfs", "-R", f"dump /traces/{parts[4]} {target}", str(cache)],
                capture_output=True,
                check=True,
            )
            out.append(target)
    return out


def publish_profile(setup: Setup, traces: list[Path], image: Path) -> None:
    """Merge recorded traces into a profile and publish it as the next version."""
    profile = setup.workdir / "boot.profile"
    seedboot("profile", "merge", *map(str, traces), "--out", str(profile))
    seedboot(
        "publish",
        str(image),
        "--mirror",
        str(setup.mirror),
        "--name",
        NAME,
        "--key",
        str(setup.key),
        "--profile",
        str(profile),
        *(["--block-size", setup.block_size] if setup.block_size else []),
    )
    setup.has_profile = True


def cpu_split(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Who used the CPU from the agent's first line to the switch, in seconds, from its timing
    line: agent, commands (mostly modprobe), daemon, kernel, idle, and the daemon's threads as
    ``daemon:NAME`` (fetcher, verify, local-copy, main...); empty without that line."""
    for _t, line in lines:
        m = CPU_SPLIT.search(line)
        if m:
            agent, commands, daemon, threads, kernel, idle = m.groups()
            out = dict(zip(CPU_KEYS, map(float, (agent, commands, daemon, kernel, idle)), strict=True))
            for name, secs in DAEMON_THREAD.findall(threads or ""):
                out[f"daemon:{name}"] = float(secs)
            return out
    return {}


def stages(lines: list[tuple[float, str]], marker_at: float | None) -> dict[str, float]:
    """Where the time went, from the agent's console lines, in seconds: 'firmware' (QEMU start
    to the kernel), 'kernel' (to init), 'agent start' (init to the agent being ready), each
    stage, and 'os' (the switch to the marker). Without the agent's start line, 'kernel' is
    QEMU start to the first stage."""
    out: dict[str, float] = {}
    first_start: float | None = None
    last_end = 0.0
    for t, line in lines:
        up = AGENT_UP.search(line)
        ready, init = AGENT_READY.search(line), AGENT_INIT.search(line)
        if up and ready and init:
            uptime, init_at = float(up.group(1)), float(init.group(1))
            out.update(
                {"firmware": t - uptime, "kernel": init_at, "agent start": float(ready.group(1)) - init_at}
            )
            continue
        m = STAGE_LINE.search(line)
        if not m:
            continue
        took = float(m.group(2))
        if first_start is None:
            first_start = t - took
        out[m.group(1)] = took
        last_end = t
    if first_start is None:
        return {}
    if "kernel" not in out:
        out = {"kernel": first_start, **out}
    if marker_at is not None:
        out["os"] = marker_at - last_end
    return out
