"""Stage 09's measurements: how close every configuration of the proof lands to one device.

NOTES.md's table comes from here:

    python stages/09_pipeline/measure.py        # the parity matrix of test_gpipe.py, with its errors
"""

from __future__ import annotations

import sys
from pathlib import Path

from goose_core.testing import largest_errors, reference_run, run_distributed

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # this stage, stages/
from test_gpipe import MATRICES, _spec, _train_many  # noqa: E402  (the test's own matrix and runs)

__all__: list[str] = []


def main() -> None:
    print("| schedule | pp | family | M | optimizer | max abs param error | max loss error | worst / PARALLEL allowance |")
    print("|---|---|---|---|---|---|---|---|")
    for schedule, matrix in MATRICES.items():
        for pp, configs in matrix.items():
            per_rank = run_distributed(_train_many, 1, pp, 1, configs, schedule, timeout=300)
            for k, (family, m, optimizer) in enumerate(configs):
                reference = reference_run(_spec(family, optimizer))
                param, loss, ratio = largest_errors([results[k] for results in per_rank], reference)
                print(f"| {schedule} | {pp} | {family} | {m} | {optimizer} | {param:.1e} | {loss:.1e} | {ratio:.1e} |")


if __name__ == "__main__":
    main()
