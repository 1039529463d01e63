"""Run every benchmarks/bench_*.py (``make bench``; or name some), append results.json, write results.md."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from benchmarks.environment import environment, load_average
from benchmarks.page import RESULTS_MD, write_page
from benchmarks.results import Entry, append, history, table


def main(names: list[str]) -> None:
    # Launch last: its 8 fresh interpreters load the machine for a minute after they exit, which
    # would land in the load average (and the timings) of whatever ran next.
    found = sorted((p.stem for p in Path(__file__).parent.glob("bench_*.py")), key=lambda n: (n == "bench_launch", n))
    chosen = [n for n in found if not names or n in names or n.removeprefix("bench_") in names]
    unknown = [n for n in names if n not in found and f"bench_{n}" not in found]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {[n.removeprefix('bench_') for n in found]}")
    run = time.strftime("%Y-%m-%d %H:%M:%S")  # one id for every record of this invocation
    entries: list[Entry] = []
    for name in chosen:
        print(f"== {name}", flush=True)
        before = load_average()
        records = importlib.import_module(f"benchmarks.{name}").run()
        env = environment(before)
        new = [Entry(r, run, env) for r in records]
        print(table(new), flush=True)
        print(f"load average {env['load_before']} -> {env['load_after']} on {env['cores']} cores", flush=True)
        entries += new
    append(entries)
    write_page(history())
    print(f"\nappended {len(entries)} records to benchmarks/results.json; newest of each in {RESULTS_MD.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
