"""How close a parallel run must come to the single-device run, stated once and explained.

The harness trains in float64 (``TrainSpec.dtype``), so the tolerances below are fp64 noise,
not a rounding pattern of one CPU. Why this holds on every machine::

    fp64 unit roundoff            u = 2**-53  ~ 1.1e-16
    measured, whole suite         max |parallel - single device| = 2.2e-14 (~200 u), every
                                  layout (dp, tp, pp, 3D, ZeRO-1, checkpointing, padding), 2-4
                                  steps, under ATEN_CPU_CAPABILITY=avx512, avx2 and default
                                  kernels; the worst element uses 0.9 % of its allowance
    PARALLEL allows               1e-12 + 1e-10 |x|          (>= 100x the measured worst)
    smallest planted bug          a gradient 0.1 % too large (SGD, 2 steps) moves the loss by
                                  4e-9 (7x its allowance) and a weight by 1.8e-8 (1.2e4x);
                                  the other planted bugs move weights by 1e-4
                                  (tests/test_harness_catches_bugs.py)

fp32 parity, by contrast, has no machine-independent constant: the same layouts differ from the
single-device run by up to 2.3e-5 in fp32 (AdamW, tp x pp x dp), by other amounts on AVX-512,
AVX2 and baseline kernels (a vectorised sum adds in another order), and a noise floor measured
beside them (gradient accumulation on one device) was 6-7x smaller under AdamW, 1x under SGD:
no factor of it is safe on every CPU. So goose proves parity in float64, where kernels and
reorderings stay 100x inside the allowance and bugs land far outside it.

bf16 (stages 01-03, and 13 across the grid) is the opposite case: 8 significant bits, so a reordered sum moves the result by
~2**-9 relative, 10**13 times fp64's, and which kernel a CPU picks changes it too: a CPU with
AVX-512 runs bf16 matmuls in oneDNN, one with only AVX2 in ATen's fallback GEMM, with other
rounding (``make test-kernels CAPABILITY=avx2`` forces that family here; see the Makefile). No
machine-independent constant exists, so the allowance is measured in the same test, on the same
CPU, from the noise floor of the single-device bf16 recipe: the reference trained again with
each change a layout makes to its sums, one at a time and together
(:data:`~goose_core.testing.reference.FLOOR_RUNS`, :func:`noise_floor_tolerances`)::

    reordered sums    the batch accumulated in 2, 4 (last-first) and 8 micro-batches: what data
                      and pipeline parallelism do to the weight gradients' sums over tokens
    split sums        every bf16 matmul summed in 2 and in 4 rounded partial products, forward
                      and input gradient (goose_core.testing.split_reductions): what tensor
                      parallelism does to the activations' and their gradients' sums
    both              split in 2 and in 4, with 2 micro-batches: tp x pp x dp
    f_loss            max |loss - reference loss| over the floor runs and steps
    f_param           max over elements of |p - p_ref| - eps_bf16 |p_ref|: what a parameter moved
                      beyond one flip of its last bf16 bit (fp32 masters straddling a rounding point
                      flip it; eps_bf16 = 2**-7 bounds one ulp relative to the value)
    losses            |x - ref| <= 2 f_loss
    params            |x - ref| <= 2 f_param + eps_bf16 |ref|

Why 2x the floor: a parallel run applies up to two of the floor's kinds of change at once (split
sums from tensor parallelism, reordered sums from data and pipeline parallelism), each no larger
than the largest floor run of its kind, so by the triangle inequality its distance from the
reference is at most the sum of two floor distances. A floor of reordered micro-batches alone
cannot make that promise: it never samples a split forward sum, and on AVX2 kernels tp=2 landed
at 2.6x such a floor. Measured (GQA Llama, SGD with momentum, 4 steps, lr 0.1), loss distance over
this floor: tp=2 1.08x and tp x pp x dp 1.03x on AVX-512 (oneDNN) kernels, 1.06x and 0.69x on AVX2
(fallback GEMM), 0.16x and 0.87x on baseline kernels; dp and pp <= 1x. A gradient 1 % too large
lands at 3.9-7.3x (the planted bug of stage 17's test_mixed_precision.py). AdamW is left out of bf16 parity: it turns the noise
of a near-zero gradient into a full lr-sized step, so its parameters differ by ~lr per step
whatever the ordering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

__all__ = ["Tolerance", "EXACT", "PARALLEL", "noise_floor_tolerances"]


class _Run(Protocol):
    losses: list[float]
    params: dict[str, Tensor]


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * |expected|``, elementwise, for losses and parameters."""

    rtol: float
    atol: float
    why: str


#: Same operations in the same order: bit-identical, e.g. the reference run against itself.
EXACT = Tolerance(0.0, 0.0, "same operations in the same order must give the same bits")

#: Any parallel layout of a float64 run: data shards, micro-batches, pipeline stages, matmuls
#: split along their reduction dimension (tensor parallelism), ZeRO-1's sharded step. Each only
#: changes where fp64 partial sums meet; see the module docstring for the numbers.
PARALLEL = Tolerance(1e-10, 1e-12, "float64 runs that only reorder sums differ by ~200 ulp; "
                                   "every planted bug lands outside it")



def noise_floor_tolerances(reference: _Run, floor_runs: Sequence[_Run],
                           dtype: torch.dtype = torch.bfloat16) -> tuple[Tolerance, Tolerance]:
    """The (losses, parameters) allowances of a low-precision parallel run, from the noise floor
    that ``floor_runs`` (the reference recipe with its sums reordered and split:
    :func:`~goose_core.testing.reference.noise_floor_runs`) measure around
    ``reference``: twice the floor, plus one flip of the parameters' last ``dtype`` bit (see the
    module docstring for why).

    Raises:
        ValueError: no floor runs, or floor runs identical to the reference (nothing measured).
    """
    if not floor_runs:
        raise ValueError("give at least one floor run: the reference recipe with its sums reordered")
    eps = torch.finfo(dtype).eps
    f_loss = max(abs(a - b) for run in floor_runs for a, b in zip(run.losses, reference.losses))
    f_param = max(float(((run.params[k].double() - ref.double()).abs() - eps * ref.double().abs()).max())
                  for run in floor_runs for k, ref in reference.params.items())
    if f_loss == 0 or f_param <= 0:
        raise ValueError(f"the floor runs measure no noise (loss {f_loss}, parameters {f_param}): reorder "
                         f"or split the sums (noise_floor_runs) so that the floor is measured, not assumed")
    why = (f"2x the {dtype} noise floor measured beside it on this CPU's kernels (the reference with "
           f"its sums reordered and split as the layouts do, on one device)")
    return (Tolerance(0.0, 2 * f_loss, f"losses: {why}: f_loss = {f_loss:.2e}"),
            Tolerance(eps, 2 * f_param, f"parameters: {why}: f_param = {f_param:.2e}, plus one last-bit flip"))
