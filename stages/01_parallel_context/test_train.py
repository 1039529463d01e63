"""Stage 01: data parallelism by hand (train.py) equals the single-device run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from goose_core import ParallelContext
from goose_core.testing import SPLIT, RunResult, TrainSpec, assert_matches_reference, reference_run, run_distributed, snapshot
from goose_core.testing.stages import load_train_script

train_script = load_train_script("01")
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
        assert_matches_reference(result, reference, SPLIT)


def test_torchrun_prints_losses_beside_the_reference() -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    script = Path(train_script.__file__)
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), "--steps", "2"],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reference" in out.stdout and "data parallel over 2 ranks" in out.stdout
