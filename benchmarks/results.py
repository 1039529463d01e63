"""Benchmark records: a goose / peer ratio with its interval, kept with its environment in results.json."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from benchmarks.paired import Pairs, verdict

__all__ = ["Record", "Entry", "RESULTS_JSON", "history", "append", "latest", "previous", "overlaps", "table"]

RESULTS_JSON = Path(__file__).with_name("results.json")


@dataclass
class Record:
    """One goose / peer measurement. ``ratio`` is the median of the paired ratios goose / peer
    (lower is better for times and bytes); ``goose`` and ``peer`` are each side's median.

    ``pairs`` is the number of paired samples behind the ratio, 0 for an exact count (bytes),
    whose interval is the ratio itself. ``paired`` is False for records from before paired
    measurement (goose timed, then the peer): they keep their ratio but have no interval.
    """

    benchmark: str
    metric: str
    goose: float
    peer: float
    peer_name: str
    unit: str
    ratio: float
    low: float | None = None
    high: float | None = None
    pairs: int = 0
    coverage: float | None = None
    paired: bool = True

    @classmethod
    def timed(cls, benchmark: str, metric: str, pairs: Pairs, peer_name: str) -> "Record":
        """A timing from :func:`benchmarks.paired.alternate` (seconds)."""
        low, high, coverage = pairs.interval
        return cls(benchmark, metric, statistics.median(pairs.goose), statistics.median(pairs.peer), peer_name,
                   "s", pairs.ratio, low, high, len(pairs.goose), coverage)

    @classmethod
    def count(cls, benchmark: str, metric: str, goose: float, peer: float, peer_name: str, unit: str) -> "Record":
        """An exact quantity (bytes, say): the same in every run, so no interval."""
        ratio = goose / peer if peer else float("nan")
        return cls(benchmark, metric, goose, peer, peer_name, unit, ratio, ratio, ratio, 0, None)

    @property
    def verdict(self) -> str:
        if not self.paired or self.low is None or self.high is None:
            return "un-paired (old record)"
        if self.pairs == 0:
            if self.ratio == 1.0:
                return "equal (count)"
            return f"goose {abs(self.goose - self.peer):.4g} {self.unit} {'lower' if self.ratio < 1 else 'higher'} (count)"
        return verdict(self.low, self.high, self.unit)


@dataclass
class Entry:
    """A record as results.json keeps it: with the run it belongs to and that run's environment."""

    record: Record
    run: str
    environment: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.record), "run": self.run, "environment": self.environment}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "Entry":
        row = _migrate(row)
        names = {f.name for f in fields(Record)}
        return cls(Record(**{k: v for k, v in row.items() if k in names}), row["run"], row["environment"])


_OLD_ENVIRONMENT = ("when", "torch", "machine", "device")


def _migrate(row: dict[str, Any]) -> dict[str, Any]:
    """A record written before paired measurement (flat environment, goose then peer timed once
    each) in today's shape: its ratio kept, no interval, ``paired`` False."""
    if "run" in row:
        return row
    env = {k: row[k] for k in _OLD_ENVIRONMENT if k in row}
    kept = {k: v for k, v in row.items() if k not in _OLD_ENVIRONMENT}
    return {**kept, "low": None, "high": None, "pairs": 0, "coverage": None, "paired": False,
            "run": row["when"], "environment": env}


def history(path: Path = RESULTS_JSON) -> list[Entry]:
    """Every record in results.json, oldest first."""
    return [Entry.from_json(row) for row in json.loads(path.read_text())] if path.exists() else []


def append(entries: list[Entry], path: Path = RESULTS_JSON) -> None:
    """Append ``entries`` to results.json (older records are rewritten in today's shape)."""
    rows = [e.to_json() for e in history(path) + entries]
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


def latest(entries: list[Entry]) -> list[Entry]:
    """Every record of each benchmark's newest run (metrics since renamed drop out)."""
    newest: dict[str, str] = {}
    for e in entries:
        newest[e.record.benchmark] = max(newest.get(e.record.benchmark, ""), e.run)
    return [e for e in entries if e.run == newest[e.record.benchmark]]


def previous(entries: list[Entry], entry: Entry) -> Entry | None:
    """The same measurement (benchmark and metric) in the newest run before ``entry``'s."""
    earlier = [e for e in entries if e.run < entry.run and e.record.benchmark == entry.record.benchmark
               and e.record.metric == entry.record.metric]
    return max(earlier, key=lambda e: e.run) if earlier else None


def overlaps(a: Record, b: Record) -> bool | None:
    """Whether two records' intervals overlap; None when either has none (un-paired) or is a count."""
    if a.low is None or a.high is None or b.low is None or b.high is None or a.pairs == 0 or b.pairs == 0:
        return None
    return a.low <= b.high and b.low <= a.high


def _value(x: float, unit: str) -> str:
    return f"{x:.4g} {unit}"


def _interval(r: Record) -> str:
    if r.low is None or r.high is None:
        return "—"
    if r.pairs == 0:
        return "exact"
    return f"[{r.low:.3f}, {r.high:.3f}]"


def table(entries: list[Entry], history_: list[Entry] | None = None) -> str:
    """A Markdown table of ``entries``; with ``history_``, a column saying whether the previous
    run's interval for the same measurement overlaps this one."""
    head = "| benchmark | metric | goose | peer | peer is | goose / peer | 95% interval | pairs | verdict |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    if history_ is not None:
        head, rule = head + " previous run overlaps |", rule + "---|"
    rows = [head, rule]
    for e in entries:
        r = e.record
        row = (f"| {r.benchmark} | {r.metric} | {_value(r.goose, r.unit)} | {_value(r.peer, r.unit)} | "
               f"{r.peer_name} | {r.ratio:.3f} | {_interval(r)} | {r.pairs or '—'} | {r.verdict} |")
        if history_ is not None:
            before = previous(history_, e)
            same = overlaps(r, before.record) if before is not None else None
            row += f" {'—' if same is None else ('yes' if same else '**no**')} |"
        rows.append(row)
    return "\n".join(rows)
