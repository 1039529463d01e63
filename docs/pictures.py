"""The course's pictures, drawn from goose's own arithmetic: ``python docs/pictures.py`` rewrites
docs/img/{grid,tp_split,zero_sharding,1f1b}.svg (byte for byte the same on every run;
tests/test_pictures.py fails when a committed picture differs from what this file draws).

The rank grid comes from :class:`goose_core.distributed.grid.ProcessGrid` and the pipeline
timetables from :func:`goose_core.pipeline.timetable`, so each picture shows what goose runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

from goose_core.distributed.grid import ProcessGrid
from goose_core.pipeline import GPipe, OneFOneB, Schedule, timetable

__all__ = ["PICTURES", "STYLE", "IMG_DIR", "grid_figure", "tp_split_figure", "zero_sharding_figure",
           "one_f_one_b_figure", "write", "write_all"]

IMG_DIR = Path(__file__).resolve().parent / "img"

#: Settings that make the SVG bytes a function of this file alone: a fixed hash salt for the
#: ids matplotlib generates, text kept as text (no font outlines that change with FreeType),
#: laid out with matplotlib's own DejaVu fonts and naming a generic fallback for the browser.
STYLE = {"svg.hashsalt": "goose-pictures", "svg.fonttype": "none", "font.family": "sans-serif",
         "font.sans-serif": ["DejaVu Sans"], "font.monospace": ["DejaVu Sans Mono"], "font.size": 10,
         "hatch.linewidth": 0.8}

#: One colour per group / micro-batch / rank (matplotlib's tab10, fixed here so a new default
#: cycle cannot change the pictures).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
PALE = "#f2f2f2"
INK = "#222222"


def _canvas(width: float, xlim: tuple[float, float], ylim: tuple[float, float]) -> tuple:
    """A figure ``width`` inches wide with one axes in equal data units, no ticks or frame: the
    pictures are diagrams. The height follows from the limits, so no margin is left empty."""
    fig = Figure(figsize=(width, width * (ylim[1] - ylim[0]) / (xlim[1] - xlim[0])))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def _centred(ax, x: float, y: float, text: str, size: float = 10, **kw) -> None:
    """Lines centred on (x, y), one text element each: SVG anchors each line at its middle, so
    the lines stay centred in whatever font the browser falls back to."""
    lines = text.split("\n")
    for k, line in enumerate(lines):
        rise = ((len(lines) - 1) / 2 - k) * size * 1.25  # points
        ax.annotate(line, (x, y), xytext=(0, rise), textcoords="offset points", ha="center", va="center",
                    fontsize=size, color=INK, **kw)


def _box(ax, x: float, y: float, w: float, h: float, text: str = "", *, face: str = "white",
         edge: str = INK, size: float = 10, **kw) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.08", facecolor=face,
                                edgecolor=edge, linewidth=1.2, **kw))
    if text:
        _centred(ax, x + w / 2, y + h / 2, text, size)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], *, color: str = INK, rad: float = 0.0,
           width: float = 1.2, style: str = "-|>", shrink: float = 0) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color, linewidth=width,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=shrink))


# --- grid.svg: which ranks form each tp, pp and dp group ------------------------------------

GRID = ProcessGrid(tp=2, pp=2, dp=2)
AXIS_TITLES = {"tp": "tensor-parallel groups", "dp": "data-parallel groups", "pp": "pipeline-parallel groups"}
AXIS_NOTES = {"tp": "all-reduce activations in every block", "dp": "reduce gradients once a step",
              "pp": "send activations stage to stage"}


def _rank_xy(grid: ProcessGrid, rank: int, x0: float) -> tuple[float, float]:
    """Where a rank sits: one box per pipeline stage, dp across, tp down (grid.py's table)."""
    c = grid.coords(rank)
    return x0 + c["pp"] * (grid.dp + 0.9) + c["dp"], -c["tp"]


def _grid_panel(ax, grid: ProcessGrid, axis: str, x0: float) -> None:
    for pp in range(grid.pp):
        left = x0 + pp * (grid.dp + 0.9) - 0.45
        _box(ax, left, -grid.tp + 0.45, grid.dp - 0.1, grid.tp + 0.2, face=PALE, edge="#bbbbbb")
        ax.text(left + (grid.dp - 0.1) / 2, 0.78, f"stage {pp}", ha="center", fontsize=9, color="#555555")
    for k, group in enumerate(grid.all_groups(axis)):  # type: ignore[arg-type]
        colour = PALETTE[k]
        points = [_rank_xy(grid, r, x0) for r in group]
        for (a, b) in zip(points, points[1:]):
            if axis == "pp":  # stage to stage, arching over (tp 0) or under (tp 1) the ranks between
                _arrow(ax, a, b, color=colour, rad=-0.3 if a[1] == 0 else 0.3, width=2.2, shrink=13)
            else:
                _arrow(ax, a, b, color=colour, width=2.5, style="-")
        for rank, (x, y) in zip(group, points):
            ax.add_patch(Rectangle((x - 0.3, y - 0.3), 0.6, 0.6, facecolor=colour, edgecolor=INK, lw=1))
            ax.text(x, y, f"r{rank}", ha="center", va="center", color="white", fontsize=11, weight="bold")
    centre = x0 + (grid.pp * (grid.dp + 0.9) - 0.9 - 1) / 2
    ax.text(centre, 1.25, AXIS_TITLES[axis], ha="center", fontsize=12, weight="bold")
    groups = "  ".join(str(g) for g in grid.all_groups(axis))  # type: ignore[arg-type]
    ax.text(centre, -grid.tp - 0.05, groups, ha="center", fontsize=10, family="monospace")
    ax.text(centre, -grid.tp - 0.45, AXIS_NOTES[axis], ha="center", fontsize=9, color="#555555")


def grid_figure(grid: ProcessGrid = GRID) -> Figure:
    """Every rank of a tp x pp x dp grid three times, coloured by its tp, dp and pp group."""
    panel = grid.pp * (grid.dp + 0.9) + 0.6
    fig, ax = _canvas(11, (-1.1, 3 * panel - 0.5), (-grid.tp - 0.65, 2.2))
    for i, axis in enumerate(("tp", "dp", "pp")):
        _grid_panel(ax, grid, axis, i * panel)
    for t in range(grid.tp):
        ax.text(-0.55, -t, f"tp {t}", ha="right", va="center", fontsize=9, color="#555555")
    for d in range(grid.dp):
        ax.text(d, 0.42, f"dp {d}", ha="center", fontsize=8, color="#555555")
    formula = f"rank = pp·{grid.dp * grid.tp} + dp·{grid.tp} + tp"
    ax.text(1.5 * panel - 0.8, 1.78, f"{grid.world_size} ranks as tp={grid.tp} × pp={grid.pp} × dp={grid.dp}:  "
            f"{formula}  (same colour = same group)", ha="center", fontsize=11)
    return fig


# --- tp_split.svg: column-parallel then row-parallel, one all-reduce forward -----------------

def _matrix(ax, x: float, y: float, w: float, h: float, held: int, by: str, colour: str) -> None:
    """A weight cut in two (by columns or rows); the half this rank holds is filled."""
    for part in range(2):
        px, py, pw, ph = (x + part * w / 2, y, w / 2, h) if by == "columns" else (x, y + (1 - part) * h / 2, w, h / 2)
        mine = part == held
        ax.add_patch(Rectangle((px, py), pw, ph, facecolor=colour if mine else "white", alpha=0.85 if mine else 1,
                               edgecolor=INK if mine else "#999999", linestyle="-" if mine else "--", lw=1.1))
        ax.text(px + pw / 2, py + ph / 2, "AB"[by == "rows"] + "₀₁"[part], ha="center", va="center",
                fontsize=10, color="white" if mine else "#999999", weight="bold" if mine else "normal")


def _operator(ax, centre: tuple[float, float], name: str) -> None:
    """Megatron's f or g: a circle on the activation's path."""
    ax.add_patch(Circle(centre, 0.25, facecolor="#fff3cd", edgecolor=INK, linewidth=1.4))
    ax.text(*centre, name, ha="center", va="center", fontsize=12, style="italic", weight="bold")


def _tp_lane(ax, rank: int, y: float) -> None:
    colour, sub = PALETTE[rank], "₀₁"[rank]
    ax.add_patch(Rectangle((2.75, y - 1.15), 7.55, 2.3, facecolor=colour, alpha=0.07, edgecolor="none"))
    ax.text(2.85, y + 0.95, f"rank {rank} (tp {rank})", fontsize=9, color=colour, weight="bold", va="center")
    _matrix(ax, 3.3, y - 0.3, 1.6, 0.6, rank, "columns", colour)
    ax.text(4.1, y - 0.65, f"Y{sub} = X A{sub}", ha="center", va="top", fontsize=10)
    _arrow(ax, (5.0, y), (5.6, y))
    _box(ax, 5.6, y - 0.3, 1.2, 0.6, f"GeLU(Y{sub})", size=9)
    ax.text(6.2, y - 0.65, "stays split", ha="center", va="top", fontsize=8, color="#555555")
    _arrow(ax, (6.8, y), (7.5, y))
    _matrix(ax, 7.5, y - 0.8, 0.6, 1.6, rank, "rows", colour)
    ax.text(8.55, y, f"Z{sub} = Y{sub} B{sub}\n(partial sum)", ha="left", va="center", fontsize=9)


def tp_split_figure() -> Figure:
    """A tp=2 MLP: f, column-parallel A, the split activation, row-parallel B, then g."""
    fig, ax = _canvas(11, (-0.1, 14.0), (-1.95, 5.2))
    _box(ax, 0.1, 0.9, 1.3, 1.2, "X\n(b·s, h)\nreplicated", size=9)
    _operator(ax, (2.1, 1.5), "f")
    _arrow(ax, (1.4, 1.5), (1.85, 1.5))
    _centred(ax, 4.1, 4.35, "column-parallel\nA = [A₀ | A₁], h × 4h", 9.5)
    _centred(ax, 7.8, 4.35, "row-parallel\nB = [B₀ ; B₁], 4h × h", 9.5)
    for rank, y in enumerate((2.8, 0.2)):
        _tp_lane(ax, rank, y)
        _arrow(ax, (2.35, 1.5), (3.3, y), rad=0.0)
        _arrow(ax, (8.5 + 1.45, y), (10.85, 1.5))
    _operator(ax, (11.1, 1.5), "g")
    _arrow(ax, (11.35, 1.5), (11.8, 1.5))
    _box(ax, 11.8, 0.8, 2.1, 1.4, "Z = Z₀ + Z₁\n+ bias (once)\nreplicated", size=9)
    ax.text(7.0, 4.95, "Tensor parallelism, tp = 2: one MLP block, one all-reduce forward",
            ha="center", fontsize=12, weight="bold")
    ax.text(0.1, -1.35, "f: identity forward, all-reduce of dX backward (the gradient reaching X "
            "sums both ranks' parts)", fontsize=9.5)
    ax.text(0.1, -1.8, "g: all-reduce forward (Z₀ + Z₁), identity backward (dZ is already whole "
            "on every rank)", fontsize=9.5)
    return fig


# --- zero_sharding.svg: what each dp rank holds under ZeRO-1/2/3 -----------------------------

#: Bytes a parameter costs in mixed-precision Adam: bf16 weight, bf16 gradient, fp32 master
#: weight + Adam's two fp32 moments.
STATES = (("parameters (bf16)", 2), ("gradients (bf16)", 2), ("optimizer state: fp32 master, m, v", 12))
#: Which states each ZeRO stage shards over the dp ranks (by index into STATES).
ZERO_STAGES = (("no ZeRO", ()), ("ZeRO-1", (2,)), ("ZeRO-2", (1, 2)), ("ZeRO-3", (0, 1, 2)))
STATE_COLOURS = ("#4c72b0", "#dd8452", "#55a868")


def bytes_per_rank(sharded: tuple[int, ...], dp: int) -> float:
    """Bytes a parameter costs on each rank when the states ``sharded`` are split over ``dp``."""
    return sum(size / dp if i in sharded else size for i, (_, size) in enumerate(STATES))


def _formula(sharded: tuple[int, ...], dp: int) -> str:
    terms = [f"{size}/{dp}" if i in sharded else str(size) for i, (_, size) in enumerate(STATES)]
    return f"{' + '.join(terms)} = {bytes_per_rank(sharded, dp):g} bytes"


def _rank_bar(ax, x: float, y: float, rank: int, dp: int, sharded: tuple[int, ...], scale: float) -> None:
    """One rank's bytes: each state cut into dp slices; a sharded state keeps slice ``rank`` only."""
    for i, (_, size) in enumerate(STATES):
        width = size * scale / dp
        for part in range(dp):
            held = i not in sharded or part == rank
            ax.add_patch(Rectangle((x + part * width, y), width, 0.5, facecolor=STATE_COLOURS[i] if held else "white",
                                   edgecolor="#555555" if held else "#bbbbbb", lw=0.6))
        x += size * scale + 0.08


def zero_sharding_figure(dp: int = 4) -> Figure:
    """For every ZeRO stage, the slices of each state each of ``dp`` ranks holds."""
    scale, gap = 0.16, 0.45
    bar = sum(size for _, size in STATES) * scale + 0.16
    right = 1.9 + dp * (bar + gap)
    fig, ax = _canvas(11, (-0.2, right + 4.6), (-len(ZERO_STAGES) * 0.9 - 1.15, 1.35))
    ax.text((right + 4.4) / 2, 1.05, f"What each of {dp} data-parallel ranks holds, per parameter "
            f"(bf16 + fp32 Adam: 2 + 2 + 12 bytes)", ha="center", fontsize=12, weight="bold")
    for r in range(dp):
        ax.text(1.9 + r * (bar + gap) + bar / 2, 0.45, f"dp rank {r}", ha="center", fontsize=10)
    ax.text(right + 0.1, 0.45, "bytes per parameter, each rank", fontsize=10)
    for row, (name, sharded) in enumerate(ZERO_STAGES):
        y = -row * 0.9 - 0.2
        ax.text(0.0, y + 0.25, name, va="center", fontsize=11, weight="bold")
        for r in range(dp):
            _rank_bar(ax, 1.9 + r * (bar + gap), y, r, dp, sharded, scale)
        ax.text(right + 0.1, y + 0.25, _formula(sharded, dp), va="center", fontsize=10)
    y = -len(ZERO_STAGES) * 0.9 - 0.35
    for i, (label, _) in enumerate(STATES):
        x = 1.9 + i * 3.6
        ax.add_patch(Rectangle((x, y), 0.35, 0.3, facecolor=STATE_COLOURS[i], edgecolor="#555555", lw=0.6))
        ax.text(x + 0.45, y + 0.15, label, va="center", fontsize=9.5)
    ax.add_patch(Rectangle((right + 0.1, y), 0.35, 0.3, facecolor="white", edgecolor="#bbbbbb", lw=0.6))
    ax.text(right + 0.55, y + 0.15, "held by another rank", va="center", fontsize=9.5)
    ax.text(0.0, y - 0.55, "goose's DistributedOptimizer (stage 06) is ZeRO-1; it keeps gradients "
            "in fp32 buffers, so it holds 2 + 4 + 12/dp bytes.", fontsize=9, color="#555555")
    return fig


# --- 1f1b.svg: GPipe and 1F1B timetables, as goose's schedules place them --------------------

def in_flight(schedule: Schedule) -> list[int]:
    """Each partition's peak count of micro-batches whose forward ran and whose backward has not."""
    peak, live = [0] * schedule.num_partitions, [0] * schedule.num_partitions
    for tick in timetable(schedule):
        for j, action in tick.items():
            live[j] += 1 if action.kind == "F" else -1
            peak[j] = max(peak[j], live[j])
    return peak


def _timetable_panel(ax, schedule: Schedule, top: float, title: str) -> None:
    ticks, p, m = timetable(schedule), schedule.num_partitions, schedule.num_microbatches
    idle = 1 - 2 * m / len(ticks)
    ax.text(0, top + 0.35, f"{title}: {len(ticks)} ticks, each stage idle {idle:.0%} "
            f"= (p − 1)/(M + p − 1) = {p - 1}/{m + p - 1}", fontsize=11, weight="bold")
    peaks = in_flight(schedule)
    for j in range(p):
        y = top - (j + 1)
        ax.text(-0.2, y + 0.5, f"stage {j}", ha="right", va="center", fontsize=10)
        ax.add_patch(Rectangle((0, y + 0.05), len(ticks), 0.9, facecolor=PALE, edgecolor="none"))
        ax.text(len(ticks) + 0.3, y + 0.5, f"{peaks[j]} in flight", va="center", fontsize=10)
        for t, tick in enumerate(ticks):
            if j in tick:
                action = tick[j]
                forward = action.kind == "F"
                ax.add_patch(Rectangle((t + 0.04, y + 0.08), 0.92, 0.84, facecolor=PALETTE[action.microbatch],
                                       alpha=1.0 if forward else 0.55, edgecolor=INK, lw=0.6,
                                       hatch=None if forward else "///"))
                ax.text(t + 0.5, y + 0.5, str(action), ha="center", va="center", fontsize=8.5,
                        color="white" if forward else INK, weight="bold")


def one_f_one_b_figure(num_stages: int = 4, num_microbatches: int = 8) -> Figure:
    """GPipe above 1F1B: the :func:`timetable` of each, one tick per forward or backward."""
    gpipe, ofob = GPipe(num_microbatches, num_stages), OneFOneB(num_microbatches, num_stages)
    width = len(timetable(gpipe))
    rows = 2 * num_stages + 3.2
    fig, ax = _canvas(11, (-2.0, width + 2.6), (-rows + 0.9, 1.75))
    ax.text(width / 2, 1.15, f"p = {num_stages} stages, M = {num_microbatches} micro-batches: F = forward, "
            f"B = backward (hatched), one colour per micro-batch", ha="center", fontsize=11)
    _timetable_panel(ax, gpipe, 0, "GPipe: every forward, then every backward")
    _timetable_panel(ax, ofob, -num_stages - 1.3, "1F1B: warm up, then one forward, one backward")
    ax.text(0, -rows + 1.2, "clock tick →   Same ticks, same bubble; \"in flight\" = the most "
            "micro-batches whose activations a stage holds at once (M for GPipe, p − j for 1F1B).",
            fontsize=9.5, color="#555555")
    return fig


# --- writing ---------------------------------------------------------------------------------

PICTURES: dict[str, Callable[[], Figure]] = {"grid": grid_figure, "tp_split": tp_split_figure,
                                             "zero_sharding": zero_sharding_figure, "1f1b": one_f_one_b_figure}


def write(name: str, out_dir: Path = IMG_DIR) -> Path:
    """Draw picture ``name`` and write ``out_dir/name.svg`` with no date and fixed ids."""
    path = Path(out_dir) / f"{name}.svg"
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        PICTURES[name]().savefig(path, format="svg", metadata={"Date": None})
    return path


def write_all(out_dir: Path = IMG_DIR) -> list[Path]:
    """Every picture into ``out_dir``."""
    return [write(name, out_dir) for name in PICTURES]


if __name__ == "__main__":
    for written in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else IMG_DIR):
        print(written)
