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
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tolerance", "EXACT", "PARALLEL"]


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

