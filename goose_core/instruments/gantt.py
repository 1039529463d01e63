"""The Gantt chart of a pipeline run: partitions as rows, micro-batches as colours, the bubble as white.

::

    stage 0 ▕█F0█F1█F2█F3█           ▒B3▒B2▒B1▒B0▒    solid: forward
    stage 1 ▕   █F0█F1█F2█F3█     ▒B3▒B2▒B1▒B0▒       hatched: backward
    stage 2 ▕      █F0█F1█F2█F3█▒B3▒B2▒B1▒B0▒         dotted, pale: recompute
             └──── time (ms) ───────────────────►     white: the bubble

matplotlib is imported only when a chart is drawn, so goose runs without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from goose_core.instruments.timeline import Span, bubble_fraction, makespan

__all__ = ["draw_gantt"]

#: How each kind of work is drawn: the micro-batch's colour, with this fill, hatch and label.
STYLES: dict[str, dict[str, Any]] = {
    "forward": {"alpha": 1.0, "hatch": None, "letter": "F"},
    "backward": {"alpha": 0.75, "hatch": "///", "letter": "B"},
    "recompute": {"alpha": 0.35, "hatch": "...", "letter": "R"},
    "weight": {"alpha": 0.55, "hatch": "xx", "letter": "W"},
}


def draw_gantt(spans: Sequence[Span], path: str | Path, title: str = "pipeline timeline",
               dpi: int = 120, axis_ms: float | None = None) -> Path:
    """Draw ``spans`` (e.g. :meth:`Timeline.gather`'s result) as a Gantt chart PNG at ``path``.

    One row per partition (stage 0 on top), time in milliseconds from the first start, one
    colour per micro-batch, forward / backward / recompute told apart by fill and hatching, and
    the bubble fraction in the title. ``axis_ms``: the time axis' length (default: this run's),
    so that charts of several runs drawn with one length compare at a glance.

    Raises:
        ValueError: no spans.
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    if not spans:
        raise ValueError("no spans to draw: record a step with a Timeline first")
    Figure, Patch = _matplotlib()
    t0 = min(s.start for s in spans)
    partitions = sorted({s.partition_idx for s in spans})
    microbatches = sorted({s.microbatch_idx for s in spans})
    colours = _colours(len(microbatches))
    fig = Figure(figsize=(10, 0.7 * len(partitions) + 1.6))
    ax = fig.add_subplot()
    width_ms = makespan(spans) * 1e3
    for span in spans:
        style = STYLES[span.kind]
        colour = colours[microbatches.index(span.microbatch_idx)]
        left, width = (span.start - t0) * 1e3, span.duration * 1e3
        row = partitions.index(span.partition_idx)
        ax.barh(row, width, left=left, height=0.8, color=colour, alpha=style["alpha"],
                hatch=style["hatch"], edgecolor="black", linewidth=0.5)
        if width > 0.02 * width_ms:  # label only bars wide enough to read
            ax.text(left + width / 2, row, f"{style['letter']}{span.microbatch_idx}", ha="center",
                    va="center", fontsize=8)
    ax.set_yticks(range(len(partitions)), [f"stage {p}" for p in partitions])
    ax.invert_yaxis()
    if axis_ms is not None:
        ax.set_xlim(0, axis_ms)
    ax.set_xlabel("time (ms)")
    ax.set_title(f"{title}: bubble {bubble_fraction(spans):.0%} of {len(partitions)} stages x "
                 f"{width_ms:.1f} ms")
    kinds = [k for k in STYLES if any(s.kind == k for s in spans)]
    handles = [Patch(facecolor="lightgrey", alpha=STYLES[k]["alpha"], hatch=STYLES[k]["hatch"],
                     edgecolor="black", label=k) for k in kinds]
    handles += [Patch(facecolor=colours[i], label=f"micro-batch {m}") for i, m in enumerate(microbatches)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _colours(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError("draw_gantt needs matplotlib: pip install matplotlib "
                          "(or install goose with its 'plot' extra)") from err
    return Figure, Patch
