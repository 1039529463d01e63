"""Stage 05: DataParallel equals the single-device run on the whole global batch."""

from dataclasses import replace

import pytest
import torch

from goose_core import DataParallel, ParallelContext
from goose_core.testing import (PARALLEL, RunResult, Tolerance, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, snapshot, train_loop)

from course import beside_reference_diffs, load_train_script, run_train_script

train_script = load_train_script("05")
GPT2 = TrainSpec(family="gpt2", steps=3)
LLAMA = TrainSpec(family="llama", steps=3)


def _train(ctx: ParallelContext, spec: TrainSpec, micro_batches: int, bucket_size_mb: float) -> RunResult:
    return train_script.train(ctx, spec, micro_batches, bucket_size_mb)


# SGD would expose a wrong gradient scale that AdamW's normalisation hides; AdamW checks the
# optimizer state and weight decay run on the reduced gradients. float64, so PARALLEL for all.
@pytest.mark.parametrize("spec, dp, micro_batches, bucket_size_mb", [
    (GPT2, 2, 1, 25.0),                                # one bucket
    (LLAMA, 4, 2, 0.05),                               # many buckets + accumulation (no_sync)
    (replace(GPT2, optimizer="sgd"), 4, 1, 0.05),
    (replace(LLAMA, optimizer="sgd"), 2, 2, 25.0),
], ids=["gpt2-adamw-dp2", "llama-adamw-dp4-accumulate", "gpt2-sgd-dp4", "llama-sgd-dp2-accumulate"])
def test_equals_the_single_device_run(spec: TrainSpec, dp: int, micro_batches: int, bucket_size_mb: float) -> None:
    reference = reference_run(spec)
    for result in run_distributed(_train, 1, 1, dp, spec, micro_batches, bucket_size_mb, timeout=120):
        assert_matches_reference(result, reference, PARALLEL)


def _frozen(ctx: ParallelContext | None, spec: TrainSpec) -> RunResult:
    model = spec.build_model()
    model.transformer.h[1].requires_grad_(False)  # a frozen layer: no gradients, no hooks
    batches = spec.batches()
    if ctx is not None:
        model = DataParallel(model, ctx, bucket_size_mb=0.05).parallelize()
        batches = spec.batches(ctx.dp_rank, ctx.dp_size)
    optimizer = spec.build_optimizer(p for p in model.parameters() if p.requires_grad)
    return RunResult(train_loop(model, optimizer, batches), snapshot(model))


def test_a_frozen_layer_neither_hangs_nor_changes_the_result() -> None:
    reference = _frozen(None, GPT2)
    for result in run_distributed(_frozen, 1, 1, 2, GPT2, timeout=60):
        assert_matches_reference(result, reference, PARALLEL)
        assert torch.equal(result.params["transformer.h.1.mlp.c_fc.weight"],
                           GPT2.build_model().transformer.h[1].mlp.c_fc.weight.detach())


def test_torchrun_prints_losses_beside_the_reference() -> None:
    out = run_train_script("05", 2, "--steps", "2", "--micro-batches", "2")
    assert "DataParallel over 2 ranks" in out
    diffs = beside_reference_diffs(out)
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs