"""Stage 04: data parallelism by hand (train.py) equals the single-device run."""


import pytest

from goose_core import ParallelContext
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run, run_distributed, snapshot

from course import beside_reference_diffs, load_train_script, run_train_script

train_script = load_train_script("04")
SPEC = TrainSpec(family="gpt2", steps=3)


def _train(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    losses = train_script.train(ctx, spec, model, optimizer)
    return RunResult(losses, snapshot(model))


@pytest.mark.parametrize("dp", [2, 4])
def test_averaged_gradients_equal_the_whole_batch(dp: int) -> None:
    results = run_distributed(_train, 1, 1, dp, SPEC, timeout=120)
    reference = reference_run(SPEC)
    for result in results:
        assert_matches_reference(result, reference, PARALLEL)


def test_torchrun_prints_losses_beside_the_reference() -> None:
    out = run_train_script("04", 2, "--steps", "2")
    assert "data parallel over 2 ranks" in out
    diffs = beside_reference_diffs(out)
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs