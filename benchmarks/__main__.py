"""Run every benchmarks/bench_*.py (``make bench``; or name some), append results.json, write results.md."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from benchmarks.results import RESULTS_MD, RESULTS_PNG, Record, append, latest, plot, table


def main(names: list[str]) -> None:
    found = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    chosen = [n for n in found if not names or n in names or n.removeprefix("bench_") in names]
    records: list[Record] = []
    for name in chosen:
        print(f"== {name}", flush=True)
        new = importlib.import_module(f"benchmarks.{name}").run()
        print(table(new), flush=True)
        records += new
    append(records)
    RESULTS_MD.write_text("# Benchmarks: the newest result of each measurement\n\n"
                          "Written by `make bench` from `results.json` (the full history, with the "
                          "environment of each run). Ratios are goose / peer, measured in the same run.\n\n"
                          + table(latest()) + "\n\n![goose / peer ratios](results.png)\n")
    plot(latest(), RESULTS_PNG)
    print(f"\nappended {len(records)} records to benchmarks/results.json; newest of each in {RESULTS_MD.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
