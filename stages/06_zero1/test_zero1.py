"""Stage 06: ZeRO-1 equals the single-device run; state is 1/dp per rank; checkpoints round-trip."""

from dataclasses import replace

import pytest
import torch

from goose_core import DistributedOptimizer, ParallelContext
from goose_core.testing import (PARALLEL, RunResult, Tolerance, TrainSpec, assert_matches_reference,
                                reference_run, run_distributed)

from course import beside_reference_diffs, load_train_script, run_train_script

train_script = load_train_script("06")
GPT2 = TrainSpec(family="gpt2", steps=3, max_grad_norm=1.0)
LLAMA = TrainSpec(family="llama", steps=3, max_grad_norm=1.0)


def _train(ctx: ParallelContext, spec: TrainSpec, micro_batches: int, bucket_size_mb: float,
           data_parallel: bool) -> RunResult:
    return train_script.train(ctx, spec, micro_batches, bucket_size_mb, data_parallel)[0]


# AdamW with weight decay and clipping (the norm is clipped on every step: it starts near 4).
# SGD without clipping checks the gradients themselves, scale included (clipping and AdamW would
# both hide a wrong scale). float64 runs: PARALLEL everywhere.
@pytest.mark.parametrize("spec, dp, micro_batches, bucket_size_mb, data_parallel, tol", [
    (GPT2, 2, 1, 0.05, True, PARALLEL),
    (LLAMA, 4, 2, 25.0, True, PARALLEL),
    (replace(GPT2, optimizer="sgd", max_grad_norm=None), 4, 1, 0.05, False, PARALLEL),
    (replace(LLAMA, optimizer="sgd", max_grad_norm=None), 2, 2, 0.05, True, PARALLEL),
], ids=["gpt2-adamw-dp2", "llama-adamw-dp4-accumulate", "gpt2-sgd-dp4-no-DataParallel",
        "llama-sgd-dp2-accumulate"])
def test_equals_the_single_device_run(spec: TrainSpec, dp: int, micro_batches: int, bucket_size_mb: float,
                                      data_parallel: bool, tol: Tolerance) -> None:
    reference = reference_run(spec)
    results = run_distributed(_train, 1, 1, dp, spec, micro_batches, bucket_size_mb, data_parallel, timeout=120)
    for result in results:
        assert_matches_reference(result, reference, tol)


def _bytes_and_checkpoints(ctx: ParallelContext, spec: TrainSpec) -> dict:
    result, optimizer = train_script.train(ctx, spec, bucket_size_mb=0.05)
    held = train_script.state_bytes(optimizer)
    # AdamW: exp_avg and exp_avg_sq for each element of this rank's shards (in the parameters'
    # dtype), one fp32 step per shard
    width = torch.empty((), dtype=spec.dtype).element_size()
    expected = sum(2 * width * b.shard_numel + 4 for b in optimizer.buckets)
    consolidated = optimizer.consolidated_state_dict()
    model = spec.build_model()
    plain = spec.build_optimizer(model.parameters())
    plain.load_state_dict(consolidated)
    fresh = DistributedOptimizer(spec.build_optimizer(spec.build_model().parameters()), ctx, bucket_size_mb=0.05)
    fresh.load_state_dict(plain.state_dict())  # a plain state dict: each rank cuts its shard
    again = DistributedOptimizer(spec.build_optimizer(spec.build_model().parameters()), ctx, bucket_size_mb=0.05)
    again.load_state_dict(optimizer.state_dict())
    return {"held": held, "expected": expected, "full": train_script.state_bytes(plain),
            "padding": sum(b.padded_numel - b.numel for b in optimizer.buckets), "shards": len(optimizer.buckets),
            "consolidated": consolidated, "plain": plain.state_dict(),
            "back": fresh.consolidated_state_dict(), "shard": optimizer.state_dict(), "shard_again": again.state_dict(),
            "shard_via_plain": fresh.state_dict()}


def _assert_identical(a: object, b: object) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_identical(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("dp", [2, 4])
def test_state_bytes_per_rank_and_bit_exact_checkpoints(dp: int) -> None:
    spec = replace(GPT2, steps=2)
    results = run_distributed(_bytes_and_checkpoints, 1, 1, dp, spec, timeout=120)
    for r in results:
        assert r["held"] == r["expected"]
        # full = 8 N + 4 P for N elements in P parameters; each rank: 8 (N + padding) / dp + 4 per shard
        params = len(r["plain"]["state"])
        assert r["held"] * dp == r["full"] + 8 * r["padding"] + 4 * (dp * r["shards"] - params)
        assert r["held"] <= 1.01 * r["full"] / dp
        _assert_identical(r["consolidated"], r["plain"])
        _assert_identical(r["consolidated"], r["back"])
        _assert_identical(r["shard"], r["shard_again"])
        _assert_identical(r["shard"], r["shard_via_plain"])  # nothing lost on the way through plain
    assert sum(r["held"] for r in results) < results[0]["full"] * 1.01


def test_torchrun_prints_losses_beside_the_reference() -> None:
    out = run_train_script("06", 2, "--steps", "2")
    assert "ZeRO-1 over 2 ranks" in out
    diffs = beside_reference_diffs(out)
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs