"""Stage 05's error table (NOTES.md): DataParallel's largest differences from the single-device run.

Run from the repository root: ``python stages/05_data_parallel/errors.py``. Each row trains the
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

train_script = load_train_script("05")
GPT2, LLAMA = TrainSpec(family="gpt2", steps=3), TrainSpec(family="llama", steps=3)
# (spec, dp, micro-batches, bucket MB): the cases of test_equals_the_single_device_run
CASES = [(GPT2, 2, 1, 25.0), (LLAMA, 4, 2, 0.05), (replace(GPT2, optimizer="sgd"), 4, 1, 0.05),
         (replace(LLAMA, optimizer="sgd"), 2, 2, 25.0)]


def _train(ctx: ParallelContext, spec: TrainSpec, micro_batches: int, bucket_size_mb: float) -> RunResult:
    return train_script.train(ctx, spec, micro_batches, bucket_size_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="float32 shows what the float64 tests keep out: AdamW's amplified rounding")
    dtype = getattr(torch, parser.parse_args().dtype)
    print("| optimizer | family | dp | micro-batches | max param error | max loss error | worst / allowance |")
    print("|---|---|---|---|---|---|---|")
    for spec, dp, micro_batches, bucket_mb in CASES:
        spec = replace(spec, dtype=dtype)
        results = run_distributed(_train, 1, 1, dp, spec, micro_batches, bucket_mb, timeout=300)
        params, loss, share = largest_errors(results, reference_run(spec))
        print(f"| {spec.optimizer} | {spec.family} | {dp} | {micro_batches} | {params:.1e} | {loss:.1e} | {share:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
