"""Stage 08's measurements: how close every configuration of the proof lands to one device.

NOTES.md's table comes from here:

    python stages/08_pipeline/measure.py        # the parity matrix of test_gpipe.py, with its errors
"""

from __future__ import annotations

import sys
from pathlib import Path

from goose_core.testing import PARALLEL, RunResult, reference_run, run_distributed

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # this stage, stages/
from test_gpipe import MATRICES, _spec, _train_many  # noqa: E402  (the test's own matrix and runs)

__all__ = ["errors"]


def errors(actual: RunResult, expected: RunResult) -> tuple[float, float, float]:
    """(max abs parameter error, max abs loss error, worst error / PARALLEL's allowance)."""
    allowance = lambda e: PARALLEL.atol + PARALLEL.rtol * abs(e)  # noqa: E731  (elementwise)
    params = [(actual.params[k], e) for k, e in expected.params.items()]
    losses = list(zip(actual.losses, expected.losses))
    param = max(float((a - e).abs().max()) for a, e in params)
    loss = max(abs(a - e) for a, e in losses)
    worst = max([float(((a - e).abs() / allowance(e)).max()) for a, e in params]
                + [abs(a - e) / allowance(e) for a, e in losses])
    return param, loss, worst


def main() -> None:
    print("| schedule | pp | family | M | optimizer | max abs param error | max loss error | worst / PARALLEL allowance |")
    print("|---|---|---|---|---|---|---|---|")
    for schedule, matrix in MATRICES.items():
        for pp, configs in matrix.items():
            per_rank = run_distributed(_train_many, 1, pp, 1, configs, schedule, timeout=300)
            for k, (family, m, optimizer) in enumerate(configs):
                reference = reference_run(_spec(family, optimizer))
                worst = [errors(results[k], reference) for results in per_rank]
                param, loss, ratio = (max(w[c] for w in worst) for c in range(3))
                print(f"| {schedule} | {pp} | {family} | {m} | {optimizer} | {param:.1e} | {loss:.1e} | {ratio:.1e} |")


if __name__ == "__main__":
    main()
