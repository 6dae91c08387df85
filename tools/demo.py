"""The demo: from nothing to an OS streamed over HTTP, then booted again offline from the cache.

Steps (each prints one line with its time): fetch Debian's kernel, build the demo root, make a
signing key, publish the root to a local mirror, serve the mirror over HTTP on loopback (a small
built-in server that counts what it sends), build the miniroot and the seed disks, boot the
qcow2 disk in QEMU through its GRUB with the network (stage lines and a live status line on
the terminal), boot the same disk again with no network device choosing GRUB's "offline"
entry, and print a summary: time per stage, blocks and bytes fetched, cache and disk sizes.
"""

from __future__ import annotations

import http.server
import logging
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

from seedboot.agent import profile as profilemod
from seedboot.agent.errors import SeedError
from seedboot.grub import menu
from seedboot.tools import (
    command,
    demoroot,
    diskformats,
    diskimage,
    freeze,
    keys,
    mkinitramfs,
    mkseed,
    publish,
    vm,
)
from seedboot.tools import kernel as kernelmod

log = logging.getLogger(__name__)

NAME = "demo"
FORMAT = "qcow2"
MARKER = demoroot.MARKER_OK
MENU = r"Rescue shell: drivers"
STAGE_RE = re.compile(r"^\[\s*([\d.]+)s\] seedboot: (\w+)\s+(ok|FAILED|skipped|\w+)\s+([\d.]+)s\s*(.*)")
AGENT_RE = re.compile(r"seedboot: agent \S+ up at ([\d.]+)s")
MARKER_RE = re.compile(re.escape(MARKER) + r".*uptime=([\d.]+)")
CACHE_RE = re.compile(r"(\d+) of (\d+) MiB free")


# --- a mirror server that counts what it serves ----------------------------------------------


@dataclass
class Served:
    requests: int = 0
    blocks: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.requests, self.blocks, self.bytes


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the agent reuses its connections
    served: Served

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def copyfile(self, source: Any, outputfile: Any) -> None:
        data = source.read()
        with self.served.lock:  # counted before sending: a client that got it sees it counted
            self.served.requests += 1
            self.served.bytes += len(data)
            if self.path.startswith("/blocks/"):
                self.served.blocks += 1
        outputfile.write(data)


class MirrorServer:
    """A threaded HTTP server for the mirror directory on 127.0.0.1 (the guest sees 10.0.2.2)."""

    def __init__(self, root: Path) -> None:
        self.served = Served()
        served = self.served

        class Handler(_Handler):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, directory=str(root), **kw)

        Handler.served = served
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MirrorServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- the live console ------------------------------------------------------------------------


class LiveConsole:
    """Prints the interesting console lines; on a terminal, a status line below them."""

    def __init__(self, label: str, served: Served, out: TextIO) -> None:
        self.label = label
        self.served = served
        self.out = out
        self.tty = out.isatty()
        self.t0 = time.monotonic()
        self.stage = "firmware"
        self.lock = threading.Lock()
        self.base = served.snapshot()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True)

    def line(self, text: str) -> None:
        show = "seedboot" in text.lower() or "Kernel panic" in text
        if "GNU GRUB" in text:
            self.stage, show, text = "GRUB menu", True, "GRUB: menu shown (serial and screen)"
        elif "Booting `" in text:
            self.stage, show, text = "kernel", True, "GRUB: " + text[text.index("Booting `") :]
        elif self.stage in ("firmware", "GRUB menu") and re.match(r"\[\s*\d+\.\d+\] ", text):
            self.stage = "kernel"
        if show and len(text) > 120 and "seedboot: " in text and not STAGE_RE.match(text):
            # GRUB draws its menu with cursor moves and no newlines: keep only its echo at the end.
            text = text[text.rfind("seedboot: ") :]
        m = STAGE_RE.search(text)
        if m:
            self.stage = m.group(2)
        elif AGENT_RE.search(text):
            self.stage = "agent"
        if not show:
            return
        with self.lock:
            if self.tty:
                self.out.write("\r\x1b[K")
            self.out.write(f"  {time.monotonic() - self.t0:6.1f}s | {text[:150]}\n")
            self._status()

    def _status(self) -> None:
        if not self.tty:
            return
        r, b, n = (x - y for x, y in zip(self.served.snapshot(), self.base, strict=True))
        self.out.write(
            f"\r\x1b[K  [{self.label}] {time.monotonic() - self.t0:6.1f}s  now: {self.stage:<10} "
            f"mirror sent {b} blocks, {n / 1e6:.1f} MB in {r} requests"
        )
        self.out.flush()

    def _tick(self) -> None:
        while not self.stop.wait(0.5):
            with self.lock:
                self._status()

    def __enter__(self) -> LiveConsole:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if self.tty:
            self.out.write("\r\x1b[K")
            self.out.flush()


# --- one boot and its numbers ----------------------------------------------------------------


@dataclass
class BootReport:
    label: str
    wall: float = 0.0
    agent_up: float | None = None
    marker_at: float | None = None
    stages: list[tuple[str, str, float, str]] = field(default_factory=list)
    requests: int = 0
    blocks: int = 0
    bytes: int = 0
    disk_before: int = 0
    disk_after: int = 0
    cache_used_mib: int | None = None
    marker_line: str = ""


def parse_console(text: str, rep: BootReport) -> None:
    for ln in text.splitlines():
        m = STAGE_RE.search(ln)
        if m:
            rep.stages.append((m.group(2), m.group(3), float(m.group(4)), m.group(5)))
            if m.group(2) == "cache":
                c = CACHE_RE.search(m.group(5))
                if c:
                    rep.cache_used_mib = int(c.group(2)) - int(c.group(1))
        a = AGENT_RE.search(ln)
        if a and rep.agent_up is None:
            rep.agent_up = float(a.group(1))
        k = MARKER_RE.search(ln)
        if k:
            rep.marker_at = float(k.group(1))
            rep.marker_line = ln.strip()


def boot(
    disk: Path,
    log_path: Path,
    server: MirrorServer,
    label: str,
    out: TextIO,
    hotkey: str = "",
    network: bool = True,
) -> BootReport:
    rep = BootReport(label, disk_before=disk.stat().st_size)
    before = server.served.snapshot()
    t0 = time.monotonic()
    with LiveConsole(label, server.served, out) as live:
        machine = vm.Machine(
            disk=disk,
            hardware=diskformats.HARDWARE[FORMAT],
            log=log_path,
            network=network,
            on_line=live.line,
        )
        with machine:
            machine.expect(MENU, timeout=300)
            if hotkey:
                what = {
                    menu.HOTKEY_OFFLINE: "offline, from cache",
                    menu.HOTKEY_RECORD: "record a boot profile",
                }
                live.line(f"seedboot demo: pressing '{hotkey}' in GRUB: {what.get(hotkey, hotkey)}")
                machine.send(hotkey)
            try:
                machine.expect(MARKER, timeout=600)
            except vm.BootError as e:
                raise SeedError(
                    f"the {label} boot did not reach the demo root: {e.message.splitlines()[0]}",
                    f"the whole console is in {log_path}",
                ) from e
            machine.wait_exit(120)
            parse_console(machine.console(), rep)
    rep.wall = time.monotonic() - t0
    after = server.served.snapshot()
    rep.requests, rep.blocks, rep.bytes = (a - b for a, b in zip(after, before, strict=True))
    rep.disk_after = disk.stat().st_size
    return rep


def traces_from_disk(disk: Path, fmt: str, cache: diskimage.Partition, work: Path) -> list[Path]:
    """The boot traces the agent saved under /knxblock/traces, read out of the disk file with
    qemu-img and debugfs (nothing mounted)."""
    raw = work / "traces-disk.img"
    part = work / "traces-cache.ext4"
    found: list[Path] = []
    try:
        command.run(["qemu-img", "convert", "-f", diskformats.FORMATS[fmt].qemu_format, "-O", "raw",
                     str(disk), str(raw)])  # fmt: skip
        diskimage.extract(raw, cache.start, cache.size, part)
        diskimage.replay_journal(part)
        listing = command.run(["debugfs", "-R", "ls -p /traces", str(part)])
        names = [f.split("/")[5] for f in listing.splitlines() if f.count("/") >= 6]
        for name in sorted(n for n in names if n.endswith(".trace")):
            dst = work / "traces" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            command.run(["debugfs", "-R", f"dump /traces/{name} {dst}", str(part)])
            found.append(dst)
    finally:
        raw.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    if not found:
        raise SeedError(f"no boot trace in /traces on {disk.name}'s cache", "was the record entry booted?")
    return found


def summary(reports: list[BootReport], published: publish.PublishResult, profile_blocks: int = 0) -> str:
    w = 16
    head = f"{'':24}" + "".join(f"{r.label:>{w}}" for r in reports)
    lines = ["", "=" * len(head), "Summary", "=" * len(head), head]

    def row(name: str, values: list[str]) -> None:
        lines.append(f"{name:24}" + "".join(f"{v:>{w}}" for v in values))

    def sec(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    row("agent's first line at", [sec(r.agent_up) for r in reports])
    names: list[str] = []
    for r in reports:
        names += [s[0] for s in r.stages if s[0] not in names]
    for n in names:
        vals = []
        for r in reports:
            got = [s for s in r.stages if s[0] == n]
            vals.append(
                "-" if not got else f"{got[0][2]:.2f} s" + ("" if got[0][1] == "ok" else f" {got[0][1]}")
            )
        row(f"  stage {n}", vals)
    row("demo root's marker at", [sec(r.marker_at) for r in reports])
    row("QEMU wall clock", [f"{r.wall:.0f} s" for r in reports])
    row("blocks fetched", [str(r.blocks) for r in reports])
    row("bytes fetched", [f"{r.bytes / 1e6:.1f} MB" for r in reports])
    row("HTTP requests", [str(r.requests) for r in reports])
    row(
        "cache in use at boot",
        ["-" if r.cache_used_mib is None else f"{r.cache_used_mib} MiB" for r in reports],
    )
    row("disk file before", [f"{r.disk_before / 1e6:.1f} MB" for r in reports])
    row("disk file after", [f"{r.disk_after / 1e6:.1f} MB" for r in reports])
    st = published.stats
    lines += [
        "",
        f"published: {published.name} v{published.version}, {st.image_size / 1e6:.0f} MB image as "
        f"{st.blocks} blocks ({st.bytes_stored / 1e6:.1f} MB stored);",
        "each boot fetched only the blocks it read (the demo root's init reads its whole data file),",
        "nothing when a block was already in the disk's cache, and nothing at all offline.",
        f"prefetched: the profile recorded by the first boot lists {profile_blocks} blocks; the second boot's"
        if profile_blocks
        else "prefetched: none (no boot profile published)",
        "block daemon downloaded those ahead of the reads, in that order (seed.prefetch=profile)."
        if profile_blocks
        else "",
    ]
    return "\n".join(lines)


# --- the whole demo --------------------------------------------------------------------------


def run(work: Path, fresh: bool = False, data_mb: int = 32, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    prog = mkseed.Progress(11, out)
    print(f"seedboot demo in {work} (console logs there too)", file=out, flush=True)
    with prog.step("kernel: Debian's linux-image-amd64 (apt-get download, depmod)"):
        k = kernelmod.fetch(work / "kernel")
    root_img = work / "demo-root.img"
    with prog.step(f"demo root: busybox ext4, {data_mb} MB file whose SHA-256 its init checks"):
        if not root_img.exists():
            demoroot.build(root_img, size_mb=data_mb + 64, data_mb=data_mb)
    key_path, pub_path = work / "demo.key", work / "demo.pub"
    with prog.step("signing key (minisign-compatible Ed25519)"):
        if not key_path.exists():
            keys.write_keypair(work / "demo", force=True)
        key = keys.load_secret_key(key_path)
    mirror = work / "mirror"
    with prog.step(f"publish to {mirror}: zstd blocks named by SHA-256, signed index"):
        shutil.rmtree(mirror, ignore_errors=True)
        published = publish.publish(root_img, mirror, NAME, key)
    print(f"      {published.stats.summary()}", file=out)
    initrd = work / "miniroot.img"
    with prog.step("miniroot: the frozen agent, busybox and driver modules (zstd cpio; slow the first time)"):
        # Rebuilt when the agent, the miniroot sources or the key change.
        want = pub_path.read_text() + mkinitramfs.source_hash(
            [freeze.AGENT_SRC, mkinitramfs.HOOKS_SRC, mkinitramfs.INITRAMFS_SRC]
        )
        stamp = work / "miniroot.stamp"
        if not initrd.exists() or not stamp.exists() or stamp.read_text() != want:
            mkinitramfs.build(k.root, [pub_path], initrd)
            stamp.write_text(want)
    print(f"      miniroot {initrd.stat().st_size / 1e6:.1f} MB", file=out)
    with MirrorServer(mirror) as server:
        with prog.step(f"serving the mirror on http://127.0.0.1:{server.port} (the guest sees 10.0.2.2)"):
            pass
        disks_dir = work / "disks"
        with prog.step("seed disks (GRUB BIOS+UEFI, kernel, miniroot, empty KNXBLOCK cache):"):
            res = mkseed.build(
                mkseed.SeedSpec(
                    mirrors=[f"http://10.0.2.2:{server.port}"],
                    names=[NAME],
                    pubkeys=[pub_path],
                    kernel=k.root,
                    out=disks_dir,
                    initrd=initrd,
                    list_from=[str(mirror)],
                    append=["panic=-1", "seed.rescue=reboot"],
                ),
                stream=cast(TextIO, _Indented(out)),
            )
        disk = res.files[FORMAT]
        print(mkseed.summary(res), file=out)
        # The first boot runs on a copy, so the second starts from an empty cache as a new user would.
        first = work / f"first-{disk.name}"
        shutil.copyfile(disk, first)
        reports: list[BootReport] = []
        hw = diskformats.HARDWARE[FORMAT]
        with prog.step(
            f"boot 1: a copy of {disk.name} in QEMU ({hw.nic}, virtio disk), network on, GRUB's "
            f"'record a boot profile' entry"
        ):
            print(file=out)
            reports.append(boot(first, work / "boot-record.log", server, "1 record", out, menu.HOTKEY_RECORD))
        profile_file = work / "demo.profile"
        with prog.step("profile: the boot's trace read off the disk (debugfs), merged, published as v2"):
            traces = traces_from_disk(first, FORMAT, res.layout.cache, work)
            blocks = profilemod.merge([profilemod.parse(t.read_bytes(), str(t)) for t in traces])
            profile_file.write_bytes(
                profilemod.encode(blocks, nblocks=-(-published.meta.image_size // published.meta.block_size))
            )
            published = publish.publish(root_img, mirror, NAME, key, profile_file=profile_file)
        print(
            f"      {len(traces)} trace(s), profile of {len(blocks)} blocks; {published.stats.summary()}",
            file=out,
        )
        with prog.step(
            f"boot 2: {disk.name} (empty cache), network on, newest version (v2, with the profile)"
        ):
            print(file=out)
            reports.append(boot(disk, work / "boot-prefetch.log", server, "2 prefetch", out))
        with prog.step("boot 3: the same disk, no network device, GRUB's 'offline, from cache' entry"):
            print(file=out)
            reports.append(
                boot(
                    disk,
                    work / "boot-offline.log",
                    server,
                    "3 offline",
                    out,
                    menu.HOTKEY_OFFLINE,
                    network=False,
                )
            )
    print(summary(reports, published, len(blocks)), file=out)
    for r in reports:
        print(f"boot {r.label}: {r.marker_line}", file=out)
    return 0


class _Indented:
    """mkseed's step lines, indented under the demo's own step."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.start = True

    def write(self, s: str) -> int:
        for part in s.splitlines(keepends=True):
            if self.start:
                self.out.write("      ")
            self.out.write(part)
            self.start = part.endswith("\n")
        return len(s)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()
