"""The benchmarks' paired measurement and records: the interval, the alternation, the verdicts, old records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks.page import write_page
from benchmarks.paired import Pairs, alternate, median_interval, verdict
from benchmarks.results import Entry, Record, append, history, latest, overlaps, previous


def test_the_interval_is_the_order_statistics_that_reach_95_percent() -> None:
    xs = [float(i) for i in range(1, 10)]  # 9 values: 2nd smallest to 2nd largest, 96.1%
    assert median_interval(list(reversed(xs))) == (2.0, 8.0, pytest.approx(1 - 2 * 10 / 512))
    low, high, coverage = median_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # too few for 95%: min..max
    assert (low, high, coverage) == (1.0, 5.0, pytest.approx(1 - 2 / 32))
    assert median_interval([0.7]) == (0.7, 0.7, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        median_interval([])


def test_the_interval_covers_the_median_95_percent_of_the_time() -> None:
    # Skewed noise (lognormal, the shape of timings under load): distribution-free means it holds here too.
    rng = random.Random(0)
    true_median = 1.0  # median of exp(N(0, 0.3))
    trials, hits = 2000, 0
    for _ in range(trials):
        low, high, _ = median_interval([rng.lognormvariate(0.0, 0.3) for _ in range(12)])
        hits += low <= true_median <= high
    assert hits / trials >= 0.95 - 0.015  # 3 binomial sd below the nominal 96.1%


def test_alternate_takes_turns_going_first() -> None:
    calls: list[str] = []

    def side(name: str, value: float):
        def sample() -> float:
            calls.append(name)
            return value
        return sample

    pairs = alternate(side("A", 2.0), side("B", 4.0), rounds=4, warmup=1)
    assert calls == ["A", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert pairs == Pairs((2.0,) * 4, (4.0,) * 4) and pairs.ratio == 0.5


@pytest.mark.parametrize("low, high, unit, want", [
    (0.97, 1.02, "s", "no difference measured"), (1.0, 1.0, "s", "no difference measured"),
    (0.80, 0.95, "s", "goose faster"), (1.01, 1.10, "s", "goose slower"), (0.5, 0.6, "B", "goose lower"),
])
def test_an_interval_holding_one_is_no_difference(low: float, high: float, unit: str, want: str) -> None:
    assert verdict(low, high, unit) == want


def _timed(run: str, ratios: list[float], metric: str = "m") -> Entry:
    pairs = Pairs(tuple(ratios), (1.0,) * len(ratios))
    return Entry(Record.timed("b", metric, pairs, "peer"), run, {"load_before": 1.0, "load_after": 2.0})


def test_records_keep_their_interval_and_old_ones_are_marked_unpaired(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    old = {"benchmark": "b", "metric": "m", "goose": 1.0, "peer": 2.0, "peer_name": "peer", "unit": "s",
           "ratio": 0.5, "when": "2026-01-01 00:00:00", "torch": "2.13", "machine": "x86_64", "device": "cpu"}
    path.write_text(json.dumps([old]))
    (migrated,) = history(path)
    assert not migrated.record.paired and migrated.record.ratio == 0.5 and migrated.record.low is None
    assert migrated.record.verdict == "un-paired (old record)"
    assert migrated.environment == {"when": "2026-01-01 00:00:00", "torch": "2.13", "machine": "x86_64", "device": "cpu"}
    first, second = _timed("2026-02-01 00:00:00", [0.9, 0.95, 1.0, 1.05, 1.1]), _timed("2026-02-02 00:00:00", [0.8] * 5)
    append([first, second], path)
    entries = history(path)
    assert [e.record.paired for e in entries] == [False, True, True]  # the old record is kept
    assert entries[1].record.verdict == "no difference measured" and entries[2].record.verdict == "goose faster"
    assert latest(entries) == [entries[2]]
    assert previous(entries, entries[2]) == entries[1]
    assert overlaps(entries[1].record, entries[2].record) is False
    assert overlaps(entries[0].record, entries[1].record) is None
    count = Record.count("b", "bytes", 10.0, 10.0, "peer", "B")
    assert (count.low, count.high, count.verdict) == (1.0, 1.0, "equal (count)")
    assert Record.count("b", "bytes", 10008.0, 10000.0, "peer", "B").verdict == "goose 8 B higher (count)"


def test_the_page_shows_intervals_and_environments(tmp_path: Path) -> None:
    entries = [_timed("2026-02-01 00:00:00", [0.9, 0.95, 1.0, 1.05, 1.1]),
               _timed("2026-02-02 00:00:00", [0.97, 0.99, 1.0, 1.01, 1.02])]
    write_page(entries, tmp_path / "results.md", tmp_path / "plots")
    page = (tmp_path / "results.md").read_text()
    assert "| [0.970, 1.020] | 5 | no difference measured | yes |" in page
    assert "1.0 → 2.0" in page and "## How to read these numbers" in page
    assert (tmp_path / "plots" / "b.png").stat().st_size > 0
