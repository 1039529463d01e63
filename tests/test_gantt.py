"""Unit tests of the Gantt chart: a PNG with every micro-batch's colour, and clear errors."""

import sys
from pathlib import Path

import pytest

from goose_core.instruments.gantt import draw_gantt
from goose_core.engine.schedule import clock_cycles
from goose_core.instruments.timeline import Span

pytest.importorskip("matplotlib")


def _spans(m: int = 4, p: int = 3) -> list[Span]:
    """A GPipe step, one clock cycle per millisecond: forwards, then recompute + backward."""
    cycles = clock_cycles(m, p)
    spans = [Span("forward", i, j, k * 1e-3, (k + 1) * 1e-3) for k, cells in enumerate(cycles) for i, j in cells]
    for k, cells in enumerate(cycles):
        t = (len(cycles) + 2 * k) * 1e-3
        for i, j in cells:
            spans.append(Span("recompute", m - 1 - i, p - 1 - j, t, t + 1e-3))
            spans.append(Span("backward", m - 1 - i, p - 1 - j, t + 1e-3, t + 2e-3))
    return spans


def test_png_shows_every_microbatch_colour(tmp_path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.image import imread

    path = draw_gantt(_spans(), tmp_path / "img" / "gantt.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = {tuple(px) for px in (imread(path)[..., :3] * 255).round().astype(int).reshape(-1, 3)}
    for i in range(4):  # forward bars are opaque: their pixels are exactly the micro-batch colour
        colour = tuple(int(round(c * 255)) for c in colormaps["tab10"](i)[:3])
        assert colour in pixels
    assert (255, 255, 255) in pixels  # the bubble (and the margins) stay white


def test_no_spans_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no spans to draw"):
        draw_gantt([], tmp_path / "x.png")


def test_missing_matplotlib_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ImportError, match="draw_gantt needs matplotlib: pip install matplotlib"):
        draw_gantt(_spans(), tmp_path / "x.png")
