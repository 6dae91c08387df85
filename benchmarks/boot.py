"""Boot time of the workload from local disk, from seedboot and from its peers: the paper's
Table 3 and Figures 8-9, reproduced on this machine in one run (issue 7).

    .venv/bin/python -m benchmarks.boot [--runs 3] [--only a,d,e3] [--smoke]

Builds or reuses the workload under build/bench/ (Debian 12 minbase, 1 GiB ext4; see
``workload``), then boots every configuration in QEMU (software emulation, -smp 1, -m 1024,
the same for all), QEMU start to the marker, ``--runs`` times each, round-robin so that noise
from other load spreads over all configurations. Prints the table (median [min-max], ratio to
the local-disk baseline (a), the paper's figure and our goal beside it, bytes over the wire),
writes ``results.json`` and, with matplotlib (``pip install -e '.[bench]'``), the PNG plots.

Configurations:
  (a)  local virtio disk, plain busybox initramfs (the baseline, like the paper's DVD)
  (b)  seedboot at 0 ms, (c) at 100 ms without profile, (d) at 100 ms with a recorded profile
  (e*) QEMU's curl block driver (default and 4 MiB readahead) and nbdkit curl + readahead +
       cache filters over NBD, at 0 and 100 ms
  (f)  seedboot's second boot from its cache, no network
Latency comes from ``seedboot.tools.latency_proxy`` between the HTTP client and nginx.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import peers, seedboot_runs, vm, workload
from seedboot.tools.latency_proxy import LatencyProxy
from tests.helpers import Nginx

log = logging.getLogger("benchmarks.boot")

MIB = 1024 * 1024
# Table 3 of the paper (KNOPPIX, NetBSD and Plan9 on Xen; 100 ms from dummynet), % of the DVD.
PAPER = {
    "a": "100% (DVD)",
    "b": "85-102% (DLAHEAD)",
    "c": "235-268%",
    "d": "143-157% (DLAHEAD)",
}
# Issue 7's goals, as the largest ratio to (a).
GOALS = {"b": 1.2, "c": 1.6, "d": 1.25}


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    kind: str  # local | qemu-curl | nbdkit | seedboot
    rtt: float | None  # None: no network at all
    readahead: int | None = None
    cache_on_read: bool = True
    mode: str = ""  # seedboot: profile | noprofile | offline


def configs(rtt: float) -> list[Config]:
    ms = f"{rtt * 1000:.0f} ms"
    return [
        Config("a", "local disk, busybox initramfs", "local", None),
        Config("a0", "local disk, no NIC", "local", None, mode="nonic"),
        Config("b", "seedboot, profile", "seedboot", 0.0, mode="profile"),
        Config("c", "seedboot, no profile", "seedboot", rtt, mode="noprofile"),
        Config("d", "seedboot, profile", "seedboot", rtt, mode="profile"),
        Config("f", "seedboot, 2nd boot from cache, no network", "seedboot", None, mode="offline"),
        Config("u", "seedboot, an update's 1st boot, profile", "seedboot", rtt, mode="update"),
        Config("e1", "QEMU curl, default readahead", "qemu-curl", 0.0),
        Config("e2", "QEMU curl, readahead 4M", "qemu-curl", 0.0, readahead=4 * MIB),
        Config("e3", "nbdkit curl+readahead+cache", "nbdkit", 0.0),
        Config("e4", f"QEMU curl, default readahead, {ms}", "qemu-curl", rtt),
        Config("e5", f"QEMU curl, readahead 4M, {ms}", "qemu-curl", rtt, readahead=4 * MIB),
        Config("e6", f"nbdkit curl+readahead+cache, {ms}", "nbdkit", rtt),
        Config("e7", f"nbdkit, no cache-on-read, {ms}", "nbdkit", rtt, cache_on_read=False),
    ]


SMOKE_KEYS = ("a", "e4")


@dataclass
class Run:
    seconds: float | None
    wire_bytes: int = 0
    read_bytes: int = 0
    read_ops: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # seedboot_runs.cpu_split
    trace: list[tuple[float, int, int]] = field(default_factory=list)
    error: str = ""
    cache_after: str = ""  # (d): its cache partition after the power-off (seedboot_runs.fs_state)


@dataclass
class Row:
    config: Config
    runs: list[Run] = field(default_factory=list)
    skipped: str = ""

    def times(self) -> list[float]:
        return [r.seconds for r in self.runs if r.seconds is not None]

    def median(self) -> float | None:
        t = self.times()
        return statistics.median(t) if t else None

    def median_run(self) -> Run | None:
        ok = sorted((r for r in self.runs if r.seconds is not None), key=lambda r: r.seconds or 0)
        return ok[len(ok) // 2] if ok else None


class Bench:
    """Everything the runs share: workload, nginx, and seedboot's setup once it is built."""

    def __init__(self, work: workload.Workload, out: Path, timeout: float, icount: bool = False) -> None:
        self.work = work
        self.icount = icount
        self.out = out
        self.timeout = timeout
        self.www = workload.BUILD / "www"
        self.seed: seedboot_runs.Setup | None = None
        self.filled_cache: Path | None = None
        self.nginx: Nginx | None = None

    @contextmanager
    def serving(self) -> Iterator[Nginx]:
        self.www.mkdir(parents=True, exist_ok=True)
        for name, target in (
            ("disk.img", self.work.image),
            ("mirror", seedboot_runs.mirror_dir(workload.BUILD)),
            ("mirror-update", seedboot_runs.mirror_dir(workload.BUILD).parent / "update" / "mirror"),
        ):
            link = self.www / name
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        self.nginx = Nginx(root=self.www, workdir=self.out / "nginx").start()
        try:
            yield self.nginx
        finally:
            self.nginx.stop()

    def boot(
        self, cfg: Config, i: int, initrd: Path, append: str, extra: list[str], wait_poweroff: float = 0.0
    ) -> vm.Boot:
        return vm.boot(
            self.work.kernel.vmlinuz,
            initrd,
            append,
            extra,
            workload.MARKER,
            self.out / "logs" / f"{cfg.key}-{i}.log",
            timeout=self.timeout,
            wait_poweroff=wait_poweroff,
            icount=self.icount,
        )

    def run(self, cfg: Config, i: int) -> Run:
        assert self.nginx is not None
        if cfg.kind == "local":
            drive = ["-drive", f"file={self.work.image},format=raw,if=virtio,snapshot=on"]
            drive += ["-nic", "none"] if cfg.mode == "nonic" else vm.NIC
            return self._result(self.boot(cfg, i, self.work.initrd, "", drive), None)
        if cfg.kind == "seedboot" and cfg.mode == "offline":
            return self._seedboot_offline(cfg, i)
        if cfg.kind == "seedboot" and cfg.mode == "update" and self.filled_cache is None:
            return Run(None, error="no cache disk left by a (d) boot")
        with LatencyProxy(upstream=("127.0.0.1", self.nginx.port), rtt=cfg.rtt or 0.0, trace=True) as proxy:
            if cfg.kind == "qemu-curl":
                drive = peers.qemu_curl_drive(f"{proxy.url}/disk.img", cfg.readahead)
                proxy.reset_counters()
                return self._result(self.boot(cfg, i, self.work.initrd, "", drive), proxy)
            if cfg.kind == "nbdkit":
                url = f"{proxy.url}/disk.img"
                with peers.nbdkit_curl(url, self.out / "nbdkit", cfg.cache_on_read) as drive:
                    proxy.reset_counters()
                    return self._result(self.boot(cfg, i, self.work.initrd, "", drive), proxy)
            return self._seedboot_online(cfg, i, proxy)

    def _seedboot_online(self, cfg: Config, i: int, proxy: LatencyProxy) -> Run:
        assert self.seed is not None
        # (u): the update's first boot, from what (d) left on its cache disk
        update = cfg.mode == "update"
        cache = seedboot_runs.cache_disk(
            self.out / "cache" / f"{cfg.key}.img", copy_of=self.filled_cache if update else None
        )
        flags = ["seed.prefetch=off"] if cfg.mode == "noprofile" else ["seed.prefetch=profile"]
        mirror = "mirror-update" if update else "mirror"
        append = self.seed.append(f"http://10.0.2.2:{proxy.port}/{mirror}", *flags)
        extra = vm.NIC + seedboot_runs.cache_drive(cache)
        keep = cfg.key == "d"
        proxy.reset_counters()
        b = self.boot(cfg, i, self.seed.initrd, append, extra, wait_poweroff=60.0 if keep else 0.0)
        run = self._result(b, proxy)
        if keep and b.ok:
            # the agent's shutdown unit leaves it clean (agent/quiesce.py): no journal replay in (f)
            run.cache_after = seedboot_runs.fs_state(cache)
            # (f) boots from what (d) left on its cache disk.
            self.filled_cache = cache.with_name("filled.img")
            cache.replace(self.filled_cache)
        return run

    def _seedboot_offline(self, cfg: Config, i: int) -> Run:
        assert self.seed is not None
        if self.filled_cache is None:
            return Run(None, error="no cache disk left by a (d) boot")
        cache = seedboot_runs.cache_disk(self.out / "cache" / "f.img", copy_of=self.filled_cache)
        append = self.seed.append(None, "seed.offline")
        b = self.boot(cfg, i, self.seed.initrd, append, ["-nic", "none", *seedboot_runs.cache_drive(cache)])
        return self._result(b, None)

    def record_profile(self) -> None:
        """One untimed boot at 0 ms recording its block trace; publish it as the boot profile."""
        assert self.seed is not None and self.nginx is not None
        profiled = self.seed.workdir / "profiled"
        if (
            profiled.exists()
            and profiled.stat().st_mtime >= (self.seed.workdir / "published").stat().st_mtime
        ):
            self.seed.has_profile = True
            return
        log.info("recording a boot profile (one boot at 0 ms with seed.record)")
        rec = Config("rec", "profile recording", "seedboot", 0.0, mode="noprofile")
        cache = seedboot_runs.cache_disk(self.out / "cache" / "record.img")
        with LatencyProxy(upstream=("127.0.0.1", self.nginx.port)) as proxy:
            append = self.seed.append(
                f"http://10.0.2.2:{proxy.port}/mirror", "seed.prefetch=off", "seed.record"
            )
            b = self.boot(
                rec,
                0,
                self.seed.initrd,
                append,
                vm.NIC + seedboot_runs.cache_drive(cache),
                wait_poweroff=60.0,
            )
        if not b.ok:
            raise RuntimeError(f"the profile recording boot failed: {b.error}")
        traces = seedboot_runs.extract_traces(cache, self.out / "traces")
        if not traces:
            raise RuntimeError(f"the recording boot left no trace on {cache}")
        seedboot_runs.publish_profile(self.seed, traces, self.work.image)
        profiled.write_text("1\n")

    def _result(self, b: vm.Boot, proxy: LatencyProxy | None) -> Run:
        seconds, error = b.seconds, b.error
        if self.icount and seconds is not None:
            seconds = b.guest_seconds
            error = error or ("" if seconds is not None else "the marker line has no guest-uptime=")
        return Run(
            seconds=seconds,
            wire_bytes=wire_to_marker(proxy, b.seconds) if proxy else 0,
            read_bytes=b.read_bytes,
            read_ops=b.read_ops,
            stages=seedboot_runs.stages(b.lines, b.seconds) or baseline_stages(b),
            cpu=seedboot_runs.cpu_split(b.lines),
            trace=proxy.trace if proxy else [],
            error=error,
        )


ICOUNT_STAMP = "icount"  # in a results directory: its times are -icount guest times


def wire_to_marker(proxy: LatencyProxy, seconds: float | None) -> int:
    """Bytes the mirror sent up to the marker, like the guest's reads, which are counted then:
    (d) lets the guest shut down cleanly afterwards (its cache is (f)'s), and what systemd
    reads while stopping is no part of the boot. The proxy's clock starts just before QEMU."""
    if seconds is None:
        return proxy.bytes_down
    return max((down for t, _up, down in proxy.trace if t <= seconds), default=0)


def baseline_stages(b: vm.Boot) -> dict[str, float]:
    """The plain initramfs's split: QEMU start to its switch_root, then the OS to the marker."""
    switch = next((t for t, line in b.lines if "bench-init: root mounted" in line), None)
    if switch is None or b.seconds is None:
        return {}
    return {"to switch_root": switch, "os": b.seconds - switch}


def fmt_time(row: Row) -> str:
    t = row.times()
    if not t:
        return "failed" if row.runs else "-"
    s = f"{statistics.median(t):6.1f} [{min(t):.1f}-{max(t):.1f}]"
    if len(t) < len(row.runs):
        s += f" ({len(t)}/{len(row.runs)} ok)"
    return s


def table(rows: list[Row], rtt: float, runs: int, icount: bool = False) -> str:
    base = next((r.median() for r in rows if r.config.key == "a"), None)
    what = (
        f"guest time at the marker under {' '.join(vm.ICOUNT)} (instructions counted, not the host's clock)"
        if icount
        else "QEMU start to the marker"
    )
    out = [
        f"Boot time, {what} (TCG, -smp 1, -m {vm.MEMORY_MB}), seconds: median [min-max] "
        f"of {runs}; latency {rtt * 1000:.0f} ms RTT from the user-space proxy",
        "",
        "(vs (a): ratio of medians, then of minimums: the fastest run is the least disturbed by other load)",
        "",
        f"{'':4} {'configuration':42} {'RTT':>6}  {'time s':<22} {'vs (a)':>12}  {'paper':<19} "
        f"{'goal':>6}  {'wire MB':>8}",
    ]
    base_min = next((min(r.times()) for r in rows if r.config.key == "a" and r.times()), None)
    for row in rows:
        cfg = row.config
        rtt_s = "-" if cfg.rtt is None else f"{cfg.rtt * 1000:.0f}ms"
        if row.skipped:
            out.append(f"({cfg.key + ')':3} {cfg.label:42} {rtt_s:>6}  skipped: {row.skipped}")
            continue
        med = row.median()
        ratio = f"{med / base * 100:.0f}%" if med and base else "-"
        if base_min and row.times():
            ratio += f" / {min(row.times()) / base_min * 100:.0f}%"
        goal = f"<={GOALS[cfg.key] * 100:.0f}%" if cfg.key in GOALS else ""
        mr = row.median_run()
        wire = f"{mr.wire_bytes / 1e6:8.1f}" if mr and cfg.rtt is not None else "-"
        out.append(
            f"({cfg.key + ')':3} {cfg.label:42} {rtt_s:>6}  {fmt_time(row):<22} {ratio:>12}  "
            f"{PAPER.get(cfg.key, ''):<19} {goal:>6}  {wire:>8}"
        )
    a = next((r.median_run() for r in rows if r.config.key == "a"), None)
    if a is not None:
        out.append(
            f"\nThe guest reads {a.read_bytes / 1e6:.1f} MB in {a.read_ops} reads from its disk in (a)."
        )
    out += goal_lines(rows)
    out += stage_lines(rows)
    return "\n".join(out)


def goal_lines(rows: list[Row]) -> list[str]:
    """Issue 7's goals, on medians and (in brackets) on minimums."""
    med = {r.config.key: r.median() for r in rows}
    low = {r.config.key: min(r.times()) if r.times() else None for r in rows}
    lines = []

    def check(name: str, value: tuple[float, float] | None, limit: float) -> None:
        if value is not None:
            verdict = "met" if value[0] <= limit else "NOT met"
            lines.append(f"  {name:44} {value[0]:5.2f} [{value[1]:5.2f}]  (goal <= {limit}: {verdict})")

    def ratio(x: str, y: str) -> tuple[float, float] | None:
        a, b, c, d = med.get(x), med.get(y), low.get(x), low.get(y)
        return (a / b, c / d) if a and b and c and d else None

    check("streaming penalty (d)/(b)", ratio("d", "b"), 1.05)
    check("end to end at 100 ms, profile (d)/(a)", ratio("d", "a"), 1.25)
    check("100 ms without profile (c)/(a)", ratio("c", "a"), 1.6)
    check("0 ms (b)/(a)", ratio("b", "a"), 1.2)
    peers_100 = [k for k in ("e4", "e5", "e6", "e7") if med.get(k)]
    if peers_100:
        best_med = min(peers_100, key=lambda k: med[k] or 0)
        best_low = min(peers_100, key=lambda k: low[k] or 0)
        d_med, d_low = med.get("d"), low.get("d")
        if d_med and d_low:
            best = ((d_med / (med[best_med] or 1)), d_low / (low[best_low] or 1))
            check(f"(d) / best peer at 100 ms ({best_med})", best, 0.5)
    a = next((r.median_run() for r in rows if r.config.key == "a"), None)
    for key in ("b", "c", "d"):
        row = next((r for r in rows if r.config.key == key), None)
        run = row.median_run() if row else None
        if run and a and a.read_bytes:
            wire = [r.wire_bytes for r in row.runs if r.seconds is not None] if row else []
            check(
                f"wire bytes / guest reads ({key})",
                (run.wire_bytes / a.read_bytes, min(wire) / a.read_bytes),
                1.0,
            )
    update = ratio("u", "d")
    if update is not None:  # not one of issue 7's: what an update's first boot costs against (d)
        name = "an update's first boot (u)/(d), no goal"
        lines.append(f"  {name:44} {update[0]:5.2f} [{update[1]:5.2f}]")
    return ["", "Goals (issue 7): median [minimum]", *lines] if lines else []


def stage_lines(rows: list[Row]) -> list[str]:
    lines = []
    for row in rows:
        run = row.median_run()
        if run and run.stages:
            split = ", ".join(f"{k} {v:.1f}" for k, v in run.stages.items())
            lines.append(f"  ({row.config.key}) {split}")
        if run and run.cpu:
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in run.cpu.items() if ":" not in k)
            lines.append(f"      CPU from the agent's first line to the switch: {cpu}")
            threads = ", ".join(f"{k[7:]} {v:.2f}" for k, v in run.cpu.items() if k.startswith("daemon:"))
            if threads:
                lines.append(f"      of the block daemon's, by thread (its start is in main): {threads}")
    for row in rows:
        states = [r.cache_after for r in row.runs if r.cache_after]
        if states:
            counts = ", ".join(f"{s} {states.count(s)} of {len(states)}" for s in sorted(set(states)))
            lines.append(f"  ({row.config.key}) left its cache partition, after the power-off: {counts}")
    head = "Where the time goes, seconds (median run; 'os' is switch_root to the marker):"
    return ["", head, *lines] if lines else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.boot", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="boots per configuration (default %(default)s)")
    p.add_argument("--only", help="comma-separated configuration keys, e.g. a,d,e6")
    p.add_argument("--rtt", type=float, default=100.0, help="the high latency, ms RTT (default %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny busybox OS, configurations a and e4, one run")
    p.add_argument("--out", type=Path, help="results directory (default build/bench/results/TIMESTAMP)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per boot before giving up")
    p.add_argument("--kernel", type=Path, help="kernel directory (seedboot kernel fetch --out DIR) to reuse")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--keep-caches",
        action="store_true",
        help="keep the seedboot boots' cache disks (OUT/cache/*.img: the block cache, the local copy)",
    )
    p.add_argument(
        "--block-size",
        default="",
        metavar="SIZE",
        help="publish the workload with this block size (seedboot publish --block-size; default its own)",
    )
    p.add_argument(
        "--icount",
        action="store_true",
        help="time each boot by the guest's instruction-counted clock (QEMU -icount): reproducible on a "
        "busy host, for comparing changes; the stage split stays on the host's clock",
    )
    p.add_argument(
        "--append",
        default="",
        metavar="ARGS",
        help="more kernel command line for every boot, e.g. systemd.show_status=1 to see where the OS's "
        "time goes (it changes what is measured: compare runs made with the same ARGS)",
    )
    p.add_argument("--table", type=Path, metavar="DIR", help="print and plot a finished run's results again")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.table:
        rows = load(args.table)
        runs = max((len(r.runs) for r in rows), default=0)
        text = table(rows, args.rtt / 1000, runs, (args.table / ICOUNT_STAMP).exists())
        print(text)
        (args.table / "table.txt").write_text(text + "\n")
        if not args.no_plots:
            from benchmarks import plots

            print("plots: " + ", ".join(map(str, plots.write(rows, args.table))))
        return 0
    # A plain kill ends the run like Ctrl-C: QEMU, nbdkit and nginx are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    rtt = args.rtt / 1000
    selected = configs(rtt)
    runs = args.runs
    if args.smoke:
        selected = [c for c in selected if c.key in SMOKE_KEYS]
        runs = 1 if args.runs == 3 else args.runs
    if args.only:
        keys = {k.strip() for k in args.only.split(",")}
        unknown = keys - {c.key for c in selected}
        if unknown:
            p.error(f"unknown configuration(s) {', '.join(sorted(unknown))}")
        selected = [c for c in selected if c.key in keys or c.key == "a"]
    out = (args.out or workload.BUILD / "results" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    say = progress_printer()
    say("workload: building or reusing " + ("the smoke image" if args.smoke else "Debian 12 minbase, 1 GiB"))
    work = workload.prepare(smoke=args.smoke, kernel_dir=args.kernel)
    vm.EXTRA_APPEND = args.append
    bench = Bench(work, out, args.timeout, args.icount)
    if args.icount:
        (out / ICOUNT_STAMP).write_text(" ".join(vm.ICOUNT) + "\n")
    rows = [Row(c) for c in selected]
    with bench.serving():
        seed_rows = [r for r in rows if r.config.kind == "seedboot"]
        if seed_rows:
            why = seedboot_runs.available()
            if not why:
                try:
                    say("seedboot: publishing the image and building the miniroot")
                    bench.seed = seedboot_runs.prepare(work, workload.BUILD, args.block_size)
                    if any(r.config.mode in ("profile", "update") for r in seed_rows):
                        say("seedboot: recording a boot profile")
                        bench.record_profile()
                    if any(r.config.mode == "update" for r in seed_rows):
                        say("seedboot: publishing an update (u): systemd and libc rewritten")
                        seedboot_runs.update_mirror(bench.seed, work.image)
                except (RuntimeError, OSError) as e:
                    why = str(e)
            for r in seed_rows:
                if why:
                    r.skipped = why
            for key in ("f", "u"):
                if key in {r.config.key for r in seed_rows} and "d" not in {r.config.key for r in seed_rows}:
                    next(r for r in rows if r.config.key == key).skipped = "needs (d) in the same run"
        todo = [r for r in rows if not r.skipped]
        for i in range(runs):
            for row in todo:
                say(f"run {i + 1}/{runs}: ({row.config.key}) {row.config.label} ...", end="")
                result = bench.run(row.config, i)
                row.runs.append(result)
                if result.seconds is None:
                    say(f" FAILED: {result.error}", cont=True)
                else:
                    wire = (
                        f", {result.wire_bytes / 1e6:.1f} MB over the wire"
                        if row.config.rtt is not None
                        else ""
                    )
                    say(f" {result.seconds:.1f} s{wire}", cont=True)
            # After each round: a run stopped later still leaves a table of what it measured.
            save(rows, rtt, i + 1, out)
    text = save(rows, rtt, runs, out)
    print()
    print(text)
    if not args.no_plots:
        from benchmarks import plots

        written = plots.write(rows, out)
        if written:
            print("\nplots: " + ", ".join(str(w) for w in written))
    print(f"results: {out}")
    if not args.keep_caches:
        shutil.rmtree(out / "cache", ignore_errors=True)
    return 0 if all(r.times() or r.skipped for r in rows) else 1


def save(rows: list[Row], rtt: float, runs: int, out: Path) -> str:
    text = table(rows, rtt, runs, (out / ICOUNT_STAMP).exists())
    (out / "table.txt").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps([row_json(r) for r in rows], indent=1))
    traces = {r.config.key: [run.trace for run in r.runs] for r in rows}
    (out / "traces.json").write_text(json.dumps(traces))
    return text


def load(out: Path) -> list[Row]:
    """The rows a run saved in OUT (results.json, traces.json), to print and plot them again."""
    traces = json.loads((out / "traces.json").read_text()) if (out / "traces.json").exists() else {}
    rows = []
    for item in json.loads((out / "results.json").read_text()):
        cfg = Config(**item["config"])
        runs = [Run(**r) for r in item["runs"]]
        for run, trace in zip(runs, traces.get(cfg.key, []), strict=False):
            run.trace = [tuple(t) for t in trace]
        rows.append(Row(cfg, runs, item["skipped"]))
    return rows


def row_json(row: Row) -> dict[str, object]:
    return {
        "config": asdict(row.config),
        "skipped": row.skipped,
        "runs": [{k: v for k, v in asdict(r).items() if k != "trace"} for r in row.runs],
    }


def progress_printer() -> Callable[..., None]:
    start = time.monotonic()

    def say(text: str, end: str = "\n", cont: bool = False) -> None:
        prefix = "" if cont else f"[{time.monotonic() - start:6.0f}s] "
        print(prefix + text, end=end, file=sys.stderr, flush=True)

    return say


if __name__ == "__main__":
    sys.exit(main())
