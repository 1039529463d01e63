"""The reference harness: what "correct" means in goose, public so users can check their setups."""

from goose_core.testing.distributed import layouts, run_distributed
from goose_core.testing.layout import at_layout
from goose_core.testing.split_reductions import split_reductions
from goose_core.testing.models import EAGER_IN_DTYPE, FAMILIES, TINY_MODELS, build_model, seeded_model, tiny_config
from goose_core.testing.reference import (
    PRECISIONS,
    RunResult,
    TrainSpec,
    accumulate,
    assert_matches_reference,
    FLOOR_RUNS,
    format_beside_reference,
    largest_errors,
    noise_floor_runs,
    reference_run,
    snapshot,
    train_loop,
)
from goose_core.testing.tolerances import EXACT, PARALLEL, Tolerance, noise_floor_tolerances
from goose_core.testing.widen import widen_float32

__all__ = [
    "EAGER_IN_DTYPE",
    "EXACT",
    "FLOOR_RUNS",
    "PARALLEL",
    "PRECISIONS",
    "TINY_MODELS",
    "RunResult",
    "Tolerance",
    "TrainSpec",
    "accumulate",
    "at_layout",
    "assert_matches_reference",
    "build_model",
    "format_beside_reference",
    "largest_errors",
    "noise_floor_runs",
    "noise_floor_tolerances",
    "layouts",
    "reference_run",
    "run_distributed",
    "seeded_model",
    "snapshot",
    "split_reductions",
    "tiny_config",
    "train_loop",
    "widen_float32",
]
