"""Stage 07's error table (NOTES.md): ZeRO-2's largest differences from the single-device run.

Run from the repository root: ``python stages/07_zero2_zero3/errors.py``. Each row trains a
case of ``test_equals_the_single_device_run_at_dp`` with ``train.py`` and reports, over every
rank, the largest absolute difference of a parameter and of a loss, and the worst element's share
of the ``PARALLEL`` allowance (``atol + rtol * |expected|``; above 1 the test fails).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # stages/: the course's tooling
from course import load_train_script  # noqa: E402

from goose_core import ParallelContext  # noqa: E402
from goose_core.testing import RunResult, TrainSpec, largest_errors, reference_run, run_distributed  # noqa: E402

__all__ = ["CASES"]

train_script = load_train_script("07")
GPT2 = TrainSpec(family="gpt2", steps=3, max_grad_norm=1.0)
LLAMA = TrainSpec(family="llama", steps=3, max_grad_norm=1.0)
# (spec, dp, micro-batches, every micro-batch reduce-scattered)
CASES = [(GPT2, 2, 1, False), (LLAMA, 4, 2, False), (LLAMA, 4, 2, True),
         (replace(GPT2, optimizer="sgd", max_grad_norm=None), 2, 2, True)]


def _train(ctx: ParallelContext, spec: TrainSpec, micro_batches: int, every: bool) -> RunResult:
    return train_script.train(ctx, spec, 2, micro_batches, 0.05, every)[0]


def main() -> None:
    print("| optimizer | family | dp | micro-batches | accumulation | max param error | max loss error "
          "| worst / allowance |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, dp, micro_batches, every in CASES:
        results = run_distributed(_train, 1, 1, dp, spec, micro_batches, every, timeout=300)
        params, loss, share = largest_errors(results, reference_run(spec))
        clip = " + clipping" if spec.max_grad_norm is not None else ""
        how = "-" if micro_batches == 1 else ("every micro-batch" if every else "no_sync")
        print(f"| {spec.optimizer}{clip} | {spec.family} | {dp} | {micro_batches} | {how} "
              f"| {params:.1e} | {loss:.1e} | {share:.1e} |", flush=True)


if __name__ == "__main__":
    main()
