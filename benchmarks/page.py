"""The published results page (benchmarks/results.md, the docs' Benchmarks page) and its plots."""

from __future__ import annotations

import textwrap
from pathlib import Path

from benchmarks.results import Entry, latest, table

__all__ = ["RESULTS_MD", "PLOTS", "write_page", "environment_table", "plot_family"]

RESULTS_MD = Path(__file__).with_name("results.md")
PLOTS = Path(__file__).with_name("plots")

HOW_TO_READ = """\
## How to read these numbers

- **Paired and interleaved.** goose and its peer run in the same processes, alternating: each
  round times both back to back, goose first in one round and the peer first in the next
  (`benchmarks/paired.py`). Two samples taken side by side share the machine's load at that
  moment, so their ratio cancels most of it; timing all of goose and then all of the peer
  does not (such ratios moved by ±20% between identical runs on this machine).
- **goose / peer** is the median of the per-round ratios; below 1 goose is faster (or
  smaller). The goose and peer columns are each side's median, for scale.
- **95% interval**: a distribution-free confidence interval for that median. With the *n*
  paired ratios sorted, it runs from the *k*-th smallest to the *k*-th largest, *k* chosen so
  that the true median lies outside with under 5% chance whatever the noise looks like
  (each ratio falls below the median with probability ½, so the count below is binomial).
  With 9 pairs it is the 2nd smallest to the 2nd largest ratio (96%); with 5, the smallest to
  the largest (94%).
- **"no difference measured"**: the interval contains 1.0. The run could not tell the two
  apart; any difference is smaller than this machine's noise. It is neither a win nor a
  loss, and a ratio of 0.97 with such an interval must not be read as "3% faster".
  "goose faster" / "goose slower" is said only when the whole interval lies on one side of 1.0.
- **Counts** (bytes) are exact and have no interval.
- **previous run overlaps**: whether the interval of the run before this one, for the same
  measurement, overlaps this one. Two runs of unchanged code should overlap; a **no** means
  the code or the machine changed (see the environment below) or the interval is too narrow.
- **The environment** of every run is recorded with its results (`results.json`): the CPU
  and the ATen kernel set in use, the cores, the 1-minute load average before and after each
  benchmark, the versions. These figures come from a 2-core machine shared with other jobs:
  a load average above the core count means the benchmark competed for the cores, which
  widens the intervals rather than moving the ratio. The load counts the benchmark's own
  ranks too (2 to 8 processes, the previous benchmark's still decaying in the 1-minute
  average), so compare it between runs rather than reading it as other jobs alone.
- Records from before paired measurement stay in `results.json`, marked `"paired": false`
  (one goose time over one peer time, no interval); they are no longer shown here.
"""


def environment_table(entries: list[Entry]) -> str:
    """One row per (run, benchmark) of ``entries``: where and under what load it ran."""
    rows = ["| run | benchmark | CPU | kernels | cores / threads | load before → after | torch | transformers | GPU |",
            "|---|---|---|---|---|---|---|---|---|"]
    seen: set[tuple[str, str]] = set()
    for e in entries:
        key = (e.run, e.record.benchmark)
        if key in seen:
            continue
        seen.add(key)
        env = e.environment
        rows.append(f"| {e.run} | {e.record.benchmark} | {env.get('cpu', '?')} | {env.get('kernels', '?')} | "
                    f"{env.get('cores', '?')} / {env.get('threads', '?')} | "
                    f"{env.get('load_before', '?')} → {env.get('load_after', '?')} | {env.get('torch', '?')} | "
                    f"{env.get('transformers', '?')} | {env.get('gpu') or 'none'} |")
    return "\n".join(rows)


def plot_family(entries: list[Entry], path: Path) -> None:
    """One benchmark family's timed ratios, each a point with its interval (1.0 = parity), as a PNG.
    Counts are left out: they are exact, and their scale (0.006, say) would squash the timings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [e.record for e in entries if e.record.pairs and e.record.low is not None and e.record.high is not None]
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(records) + 1.5))
    for y, r in enumerate(records):
        assert r.low is not None and r.high is not None
        color = "tab:green" if r.high < 1.0 else "tab:red" if r.low > 1.0 else "tab:gray"
        ax.errorbar([r.ratio], [y], xerr=[[r.ratio - r.low], [r.high - r.ratio]], fmt="o", color=color, capsize=4)
        ax.annotate(f"{r.ratio:.3f} [{r.low:.3f}, {r.high:.3f}]", (r.high, y), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(records)), [textwrap.fill(f"{r.metric} (vs {r.peer_name})", 55) for r in records],
                  fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    ends = [x for r in records for x in (r.low, r.high) if x is not None]
    if max(ends) / min(ends) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("goose / peer, 95% interval (lower is better; gray: no difference measured)")
    ax.set_title(records[0].benchmark)
    ax.set_ylim(len(records) - 0.5, -0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_page(entries: list[Entry], path: Path = RESULTS_MD, plots: Path = PLOTS) -> None:
    """results.md: how to read it, the newest run of every benchmark, the environments, the plots."""
    shown = latest(entries)
    families = sorted({e.record.benchmark for e in shown if e.record.pairs})
    plots.mkdir(exist_ok=True)
    for family in families:
        plot_family([e for e in shown if e.record.benchmark == family], plots / f"{family}.png")
    pictures = "\n\n".join(f"![{f}: goose / peer with intervals]({plots.name}/{f}.png)" for f in families)
    path.write_text(
        "# Benchmarks: goose beside torch-native peers\n\n"
        "Written by `make bench` from `benchmarks/results.json` (every run, with its environment). "
        "Each row is the newest run of its benchmark; the GPU throughput and MFU of real training "
        "steps are on [their own page](gpu.md) (`make bench-gpu`).\n\n"
        + HOW_TO_READ + "\n## Results\n\n" + table(shown, entries)
        + "\n\n## Environment of each run\n\n" + environment_table(shown)
        + "\n\n## Plots\n\n" + pictures + "\n", encoding="utf-8")
