"""Figures 8 and 9 of the paper for our runs: traffic (cumulative MB) and throughput (MB/s)
over boot time, one curve per configuration, one figure per latency. Needs matplotlib (the
``bench`` extra); without it the benchmark prints the table only."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.boot import Row

log = logging.getLogger(__name__)

BIN = 0.5  # seconds per throughput bar


def series(
    trace: Sequence[tuple[float, int, int]], end: float
) -> tuple[list[float], list[float], list[float]]:
    """Cumulative MB over time, and MB/s per BIN, from a proxy trace (t, up, down)."""
    times = [0.0] + [t for t, _, _ in trace]
    cum = [0.0] + [down / 1e6 for _, _, down in trace]
    nbins = max(int(end / BIN) + 1, 1)
    per_bin = [0.0] * nbins
    last = 0
    for t, _, down in trace:
        b = min(int(t / BIN), nbins - 1)
        per_bin[b] += (down - last) / 1e6 / BIN
        last = down
    return times, cum, per_bin


def write(rows: Sequence[Row], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        print("no plots: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    groups: dict[float, list[Row]] = {}
    for row in rows:
        run = row.median_run()
        if row.config.rtt is not None and run is not None and run.trace:
            groups.setdefault(row.config.rtt, []).append(row)
    written = []
    for rtt, group in sorted(groups.items()):
        fig, (ax_traffic, ax_rate) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
        for row in group:
            run = row.median_run()
            assert run is not None and run.seconds is not None
            times, cum, rate = series(run.trace, run.seconds)
            name = re.sub(r", \d+ ms$", "", row.config.label)
            label = f"({row.config.key}) {name}: {run.seconds:.1f} s, {run.wire_bytes / 1e6:.0f} MB"
            line = ax_traffic.step(times, cum, where="post", label=label)[0]
            ax_traffic.plot([run.seconds], [cum[-1]], "o", color=line.get_color())
            ax_rate.step([i * BIN for i in range(len(rate))], rate, where="post", color=line.get_color())
        fig_no = 8 if rtt == 0 else 9
        ax_traffic.set_title(
            f"Boot traffic and throughput at {rtt * 1000:.0f} ms RTT (cf. the paper's Figure {fig_no})"
        )
        # Peers fetch up to 40x what seedboot does: a log scale keeps every curve readable.
        ax_traffic.set_yscale("symlog", linthresh=1.0)
        ax_rate.set_yscale("symlog", linthresh=1.0)
        ax_traffic.set_ylabel("downloaded, MB (cumulative, log)")
        ax_traffic.legend(fontsize="small")
        ax_traffic.grid(alpha=0.3)
        ax_rate.set_ylabel(f"throughput, MB/s ({BIN} s bins, log)")
        ax_rate.set_xlabel("seconds since QEMU start (dot: marker reached)")
        ax_rate.grid(alpha=0.3)
        path = out / f"figure{fig_no}-{rtt * 1000:.0f}ms.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
