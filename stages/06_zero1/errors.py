"""Stage 06's error table (NOTES.md): ZeRO-1's largest differences from the single-device run.

Run from the repository root: ``python stages/06_zero1/errors.py``. Each row trains the
case of ``test_equals_the_single_device_run`` and reports, over every rank, the largest absolute
difference of a parameter and of a loss, and the worst element's share of the ``PARALLEL``
allowance (``atol + rtol * |expected|``; above 1 the test fails).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # stages/: the course's tooling
from course import load_train_script  # noqa: E402

from goose_core import ParallelContext  # noqa: E402
from goose_core.testing import RunResult, TrainSpec, largest_errors, reference_run, run_distributed  # noqa: E402

__all__ = ["CASES"]

train_script = load_train_script("06")
GPT2 = TrainSpec(family="gpt2", steps=3, max_grad_norm=1.0)
LLAMA = TrainSpec(family="llama", steps=3, max_grad_norm=1.0)
# (spec, dp, micro-batches, bucket MB, DataParallel): the cases of test_equals_the_single_device_run
CASES = [(GPT2, 2, 1, 0.05, True), (LLAMA, 4, 2, 25.0, True),
         (replace(GPT2, optimizer="sgd", max_grad_norm=None), 4, 1, 0.05, False),
         (replace(LLAMA, optimizer="sgd", max_grad_norm=None), 2, 2, 0.05, True)]


def _train(ctx: ParallelContext, spec: TrainSpec, micro_batches: int, bucket_size_mb: float,
           data_parallel: bool) -> RunResult:
    return train_script.train(ctx, spec, micro_batches, bucket_size_mb, data_parallel)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="float32 shows what the float64 tests keep out: AdamW's amplified rounding")
    dtype = getattr(torch, parser.parse_args().dtype)
    print("| optimizer | family | dp | micro-batches | `DataParallel` | max param error | max loss error "
          "| worst / allowance |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, dp, micro_batches, bucket_mb, data_parallel in CASES:
        spec = replace(spec, dtype=dtype)
        results = run_distributed(_train, 1, 1, dp, spec, micro_batches, bucket_mb, data_parallel, timeout=300)
        params, loss, share = largest_errors(results, reference_run(spec))
        clip = " + clipping" if spec.max_grad_norm is not None else ""
        print(f"| {spec.optimizer}{clip} | {spec.family} | {dp} | {micro_batches} | {'yes' if data_parallel else 'no'} "
              f"| {params:.1e} | {loss:.1e} | {share:.1e} |", flush=True)


if __name__ == "__main__":
    main()
