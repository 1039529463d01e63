"""Stage 08's error table (NOTES.md): tensor parallelism's largest differences from the single-device run.

Run from the repository root: ``python stages/08_tensor_parallel/errors.py``. Each row trains the
case of ``test_tp_equals_the_single_device_run`` and reports, over every rank, the largest absolute
difference of a parameter and of a loss, and the worst element's share of the ``PARALLEL``
allowance (``atol + rtol * |expected|``; above 1 the test fails).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # stages/: the course's tooling
from course import load_train_script  # noqa: E402

from goose_core.testing import TrainSpec, largest_errors, reference_run, run_distributed  # noqa: E402

__all__ = ["CASES"]

train_script = load_train_script("08")
# (family, tp): the cases of test_tp_equals_the_single_device_run, 3 AdamW steps
CASES = [(family, tp) for family in ("gpt2", "llama", "bloom") for tp in (2, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="float32 shows what the float64 tests keep out: AdamW's amplified rounding")
    dtype = getattr(torch, parser.parse_args().dtype)
    print("| family | tp | max loss error | max param error | worst / allowance |")
    print("|---|---|---|---|---|")
    for family, tp in CASES:
        spec = TrainSpec(family=family, steps=3, dtype=dtype)
        results = run_distributed(train_script.train, tp, 1, 1, spec, timeout=300)
        params, loss, share = largest_errors(results, reference_run(spec))
        print(f"| {family} | {tp} | {loss:.1e} | {params:.1e} | {share:.1e} |", flush=True)


if __name__ == "__main__":
    main()
