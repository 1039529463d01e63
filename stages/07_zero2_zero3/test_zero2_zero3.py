"""Stage 07: ZeRO-2 (and ZeRO-3) equal the single-device run at dp = 2 and 4, with accumulation,
padding, clipping, a frozen layer and tied embeddings; bf16 within the recipe's noise floor; a
bucket reduced twice fails. With tensor and pipeline parallelism (chapters 08 and 09) the same
holds: tests/test_zero2_composition.py, which stage 14 runs."""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from goose_core import DataParallel, DistributedOptimizer, ParallelContext, clip_grad_norm_
from goose_core.data import shard_batch
from goose_core.data_parallel import Bucket, count_items_over, gathered, no_sync
from goose_core.distributed.compat import reduce_scatter_flat
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, noise_floor_runs,
                                noise_floor_tolerances, reference_run, run_distributed, snapshot)

from course import beside_reference_diffs, load_train_script, run_train_script

train_script = load_train_script("07")

# ZeRO-3 lives in goose_core.data_parallel.zero3; its cases run where that module exists.
ZERO3 = importlib.util.find_spec("goose_core.data_parallel.zero3") is not None
STAGES = [2, pytest.param(3, marks=pytest.mark.skipif(not ZERO3, reason="zero_stage=3 not in this tree"))]

# float64, clipping at 1.0 (the first steps' norm is above it: the clip acts), AdamW with decay.
GPT2 = TrainSpec(family="gpt2", steps=3, max_grad_norm=1.0)  # tied wte / lm_head
LLAMA = TrainSpec(family="llama", steps=3, max_grad_norm=1.0)
BUCKET_MB = 0.05  # many buckets, several padded

pytestmark = pytest.mark.usefixtures("one_thread")  # the references run in this process


def _freeze(model: nn.Module) -> nn.Module:
    model.transformer.h[1].requires_grad_(False)  # no gradient, no hook, no shard
    return model


def run(ctx: ParallelContext | None, spec: TrainSpec, zero_stage: int, micro: int = 1, every: bool = False,
        frozen: bool = False) -> RunResult:
    """``spec`` over ``ctx``'s dp group under ZeRO-``zero_stage`` (one device and a plain
    optimizer when ``ctx`` is None), ``micro`` micro-batches a step, all but the last under
    ``no_sync`` unless ``every``."""
    model = spec.build_model()
    model = _freeze(model) if frozen else model
    if ctx is not None:
        model = DataParallel(model, ctx, bucket_size_mb=BUCKET_MB, zero_stage=zero_stage).parallelize()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = spec.build_optimizer(params)
    optimizer = DistributedOptimizer(optimizer, ctx) if ctx is not None else optimizer
    losses = []
    for batch in spec.batches(ctx.dp_rank if ctx else 0, ctx.dp_size if ctx else 1):
        step_loss = _accumulate(ctx, model, batch, micro, every)
        if spec.max_grad_norm is not None:
            if ctx is None:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            else:
                clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step_loss)
    with gathered(model):  # whole parameters (ZeRO-3 gathers them; otherwise they are)
        return RunResult(losses, snapshot(model))


def _accumulate(ctx: ParallelContext | None, model: nn.Module, batch: dict, micro: int, every: bool) -> float:
    if ctx is None:  # one device, one piece: the reference recipe
        loss = model(**batch).loss
        loss.backward()
        return loss.item()
    n = count_items_over(batch["labels"], ctx.data_parallel_group, ctx.device)
    total = 0.0
    for i in range(micro):
        quiet = i < micro - 1 and not every
        with no_sync(model) if quiet else nullcontext():
            loss = model(**shard_batch(batch, i, micro), num_items_in_batch=n).loss
            loss.backward()
        total += loss.item()
    return total


def _cases(ctx: ParallelContext, cases: list[tuple[str, dict[str, Any]]]) -> dict[str, RunResult]:
    return {name: run(ctx, **kwargs) for name, kwargs in cases}


def _dp_cases(stage: int) -> list[tuple[str, dict[str, Any]]]:
    return [("gpt2", dict(spec=GPT2, zero_stage=stage)),
            ("llama-no_sync", dict(spec=LLAMA, zero_stage=stage, micro=2)),
            ("llama-every", dict(spec=LLAMA, zero_stage=stage, micro=2, every=True)),
            ("padded", dict(spec=replace(GPT2, padding="empty"), zero_stage=stage, micro=2)),
            ("frozen", dict(spec=GPT2, zero_stage=stage, frozen=True))]


def _expected(name: str, kwargs: dict[str, Any]) -> RunResult:
    if kwargs.get("frozen"):
        return run(None, kwargs["spec"], 0, frozen=True)
    return reference_run(kwargs["spec"])


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("dp", [2, 4])
def test_equals_the_single_device_run_at_dp(stage: int, dp: int) -> None:
    cases = _dp_cases(stage)
    expected = {name: _expected(name, kwargs) for name, kwargs in cases}
    for rank, out in enumerate(run_distributed(_cases, 1, 1, dp, cases, timeout=180)):
        for name, result in out.items():
            try:
                assert_matches_reference(result, expected[name], PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"rank {rank}, {name}: {err}") from err


# SGD with momentum, lr 0.1: as stage 14's mixed-precision tests (AdamW turns rounding noise of
# near-zero gradients into lr-sized steps); the allowance is the recipe's own noise floor.
BF16 = TrainSpec(family="llama", steps=4, optimizer="sgd", lr=0.1, precision="bf16")


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_equals_the_single_device_bf16_recipe(stage: int) -> None:
    reference = reference_run(BF16)
    losses, params = noise_floor_tolerances(reference, noise_floor_runs(BF16))
    cases = [("bf16", dict(spec=BF16, zero_stage=stage)), ("bf16-every", dict(spec=BF16, zero_stage=stage,
                                                                             micro=2, every=True))]
    for rank, out in enumerate(run_distributed(_cases, 1, 1, 2, cases, timeout=180)):
        for name, result in out.items():
            try:
                assert_matches_reference(result, reference, losses, params)
            except AssertionError as err:
                raise AssertionError(f"rank {rank}, {name}: {err}\n({losses.why}; {params.why})") from err


def _reduced_twice(ctx: ParallelContext) -> RunResult:
    """Break it: each bucket of matrices reduce-scattered into its shard a second time."""
    wait = Bucket.wait

    def twice(bucket: Bucket) -> None:
        if bucket.work is None or not bucket.shard_only or bucket.params[0].dim() != 2:
            wait(bucket)
            return
        full = bucket.grad.clone()
        wait(bucket)
        again = torch.empty_like(bucket.shard_grad)
        reduce_scatter_flat(again, full, group=bucket.group)
        bucket.shard_grad.add_(again)

    Bucket.wait = twice  # type: ignore[method-assign]
    try:
        return run(ctx, replace(GPT2, optimizer="sgd", max_grad_norm=None), 2)
    finally:
        Bucket.wait = wait  # type: ignore[method-assign]


def test_break_it_a_bucket_reduced_twice_fails() -> None:
    reference = reference_run(replace(GPT2, optimizer="sgd", max_grad_norm=None))
    for result in run_distributed(_reduced_twice, 1, 1, 2, timeout=60):
        with pytest.raises(AssertionError, match="differ"):
            assert_matches_reference(result, reference, PARALLEL)


def test_torchrun_prints_losses_and_the_bytes_beside_the_formula() -> None:
    out = run_train_script("07", 2, "--steps", "2", "--family", "gpt2")
    assert "ZeRO-2 over 2 ranks" in out
    diffs = beside_reference_diffs(out)
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs
