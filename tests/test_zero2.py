"""ZeRO-2 (DataParallel(zero_stage=2) + DistributedOptimizer): equal to ZeRO-1 and to one device,
full gradient buffers released during the backward, both ways of accumulating, clear refusals,
and a bucket reduced twice caught."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from torch import nn

from goose_core import DataParallel, DistributedOptimizer, GradScaler, ParallelContext, clip_grad_norm_
from goose_core.data import shard_batch
from goose_core.data_parallel import count_items_over, no_sync, reducer_of
from goose_core.data_parallel.bucket import Bucket
from goose_core.distributed.compat import reduce_scatter_flat
from goose_core.data_parallel.reducer import GradReducer
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, snapshot)

SPEC = TrainSpec(family="gpt2", steps=2, max_grad_norm=1.0)
BUCKET_MB = 0.05  # several buckets on the tiny model: the release order is exercised


def _train(ctx: ParallelContext, spec: TrainSpec, zero_stage: int, micro_batches: int = 1,
           quiet: bool = True, probe: dict | None = None) -> RunResult:
    """ZeRO-``zero_stage`` training; ``quiet``: micro-batches but the last under ``no_sync``.
    ``probe`` collects the full buffers held after each backward and at each launch."""
    model = DataParallel(spec.build_model(), ctx, bucket_size_mb=BUCKET_MB, zero_stage=zero_stage).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    buckets = reducer_of(model).buckets
    losses = []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):
        n = count_items_over(batch["labels"], ctx.data_parallel_group, ctx.device)
        step_loss = 0.0
        for i in range(micro_batches):
            hold = quiet and i < micro_batches - 1
            with no_sync(model) if hold else nullcontext():
                loss = model(**shard_batch(batch, i, micro_batches), num_items_in_batch=n).loss
                loss.backward()
            step_loss += float(loss)
            if probe is not None:
                probe.setdefault("full_after_backward", []).append(sum(b.allocated for b in buckets))
                probe.setdefault("grads_after_backward", []).append(
                    sum(p.grad is not None for p in model.parameters()))
        if spec.max_grad_norm is not None:
            clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)
        optimizer.step()
        optimizer.zero_grad()
        if probe is not None:
            probe.setdefault("full_after_step", []).append(sum(b.allocated for b in buckets))
        losses.append(step_loss)
    if probe is not None:
        probe["buckets"] = len(buckets)
    return RunResult(losses, snapshot(model))


def _in_flight(ctx: ParallelContext) -> dict:
    """At each launch of one ZeRO-2 backward: whether every bucket before the previous one has
    released its full buffer (the release during the backward), and the launched one holds it."""
    probe: dict = {"released": [], "holding": []}
    launch = GradReducer._launch

    def recording(reducer: GradReducer, bucket: Bucket) -> None:
        launch(reducer, bucket)
        k = reducer.buckets.index(bucket)
        probe["released"].append(not any(b.allocated for b in reducer.buckets[: max(0, k - 1)]))
        probe["holding"].append(bucket.allocated)

    model = DataParallel(SPEC.build_model(), ctx, bucket_size_mb=BUCKET_MB, zero_stage=2).parallelize()
    optimizer = DistributedOptimizer(SPEC.build_optimizer(model.parameters()), ctx)
    GradReducer._launch = recording  # type: ignore[method-assign]
    try:
        model(**shard_batch(SPEC.batch(0), ctx.dp_rank, ctx.dp_size)).loss.backward()
    finally:
        GradReducer._launch = launch  # type: ignore[method-assign]
    optimizer.step()
    return probe


def _everything(ctx: ParallelContext) -> dict:
    """Every ZeRO-2 case of one dp=2 process group (spawned once)."""
    out: dict = {}
    for name, spec, micro, quiet in [("plain", SPEC, 1, True), ("no_sync", SPEC, 2, True),
                                     ("every", SPEC, 2, False),
                                     ("sgd", replace(SPEC, optimizer="sgd", max_grad_norm=None), 1, True)]:
        probe: dict = {}
        out[name] = (_train(ctx, spec, 2, micro, quiet, probe), probe, _train(ctx, spec, 1, micro, quiet))
    out["in_flight"] = _in_flight(ctx)
    out["scaled"] = _scaled(ctx)
    out["fp16"] = {stage: _fp16(ctx, stage) for stage in (1, 2)}
    return out


def _fp16(ctx: ParallelContext, zero_stage: int) -> RunResult:
    """An fp16 model with fp32 buckets and masters under a GradScaler (stage 02's recipe)."""
    spec = replace(SPEC, dtype=torch.float16, optimizer="sgd", lr=0.1)
    model = DataParallel(spec.build_model(), ctx, bucket_size_mb=BUCKET_MB, zero_stage=zero_stage).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    scaler = GradScaler(ctx, growth_interval=1)
    losses = []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):
        loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses + [scaler.get_scale()], snapshot(model))


def _scaled(ctx: ParallelContext) -> dict:
    """float64 under a GradScaler (a power-of-two scale changes no bit), and an inf planted in one
    rank's gradient shard skipping the step on every rank."""
    model = DataParallel(SPEC.build_model(), ctx, bucket_size_mb=BUCKET_MB, zero_stage=2).parallelize()
    optimizer = DistributedOptimizer(SPEC.build_optimizer(model.parameters()), ctx)
    scaler = GradScaler(ctx, growth_interval=1)
    losses, skipped = [], []
    for step, batch in enumerate(SPEC.batches(ctx.dp_rank, ctx.dp_size)):
        for inject in (True, False) if step == 0 else (False,):
            before = [p.detach().clone() for p in model.parameters()]
            loss = model(**batch).loss
            scaler.scale(loss).backward()
            if inject and ctx.dp_rank == 1:
                reducer_of(model).buckets[0].shard_grad[0] = float("inf")
            scaler.unscale_(optimizer)
            clip_grad_norm_(model.parameters(), SPEC.max_grad_norm, ctx)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if inject:
                skipped.append(all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
            else:
                losses.append(loss.item())
    return {"run": RunResult(losses, snapshot(model)), "skipped": skipped}


def test_zero2_equals_zero1_and_one_device_and_holds_only_shards() -> None:
    references = {"plain": reference_run(SPEC), "sgd": reference_run(replace(SPEC, optimizer="sgd",
                                                                             max_grad_norm=None))}
    for out in run_distributed(_everything, 1, 1, 2, timeout=180):
        for name in ("plain", "no_sync", "every", "sgd"):
            zero2, probe, zero1 = out[name]
            assert_matches_reference(zero2, references.get(name, references["plain"]), PARALLEL)
            # the same buckets, the same shard sums in the same order: bit-identical to ZeRO-1
            # (the every-micro-batch path adds shards in another order: PARALLEL)
            assert_matches_reference(zero2, zero1, PARALLEL if name == "every" else EXACT)
            assert probe["full_after_step"] == [0] * SPEC.steps  # nothing full between steps
            if name != "no_sync":  # no p.grad keeps a full gradient past a synced backward
                assert set(probe["grads_after_backward"]) == {0}
        assert out["plain"][1]["full_after_backward"] == [0] * SPEC.steps
        # no_sync holds the float64 gradients in p.grad until the last micro-batch, which frees them
        assert out["no_sync"][1]["full_after_backward"] == [0, 0] * SPEC.steps
        params = sum(1 for _ in SPEC.build_model().parameters())
        assert out["no_sync"][1]["grads_after_backward"] == [params, 0] * SPEC.steps
        assert out["every"][1]["full_after_backward"] == [0, 0] * SPEC.steps
        # fp16: the same fp32 sums, masters and scale decisions as ZeRO-1, bit for bit
        assert_matches_reference(out["fp16"][2], out["fp16"][1], EXACT)
        assert out["scaled"]["skipped"] == [True]  # the inf on one rank skipped the step on all
        assert_matches_reference(out["scaled"]["run"], out["plain"][0], EXACT)  # scaling changes no bit
        flight = out["in_flight"]
        assert len(flight["released"]) >= 4  # buckets enough for releases before the end
        assert all(flight["released"]) and all(flight["holding"])


def _mixed(ctx: ParallelContext) -> dict:
    """bf16 parameters: fp32 shards kept, bf16 gradients never kept, the full fp32 buffers freed."""
    spec = replace(SPEC, precision="bf16", optimizer="sgd", lr=0.1, max_grad_norm=1.0)
    out = {}
    for quiet in (True, False):
        probe: dict = {}
        model = DataParallel(spec.build_model(), ctx, bucket_size_mb=BUCKET_MB, zero_stage=2).parallelize()
        optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
        buckets = reducer_of(model).buckets
        batch = shard_batch(spec.batch(0), ctx.dp_rank, ctx.dp_size)
        n = count_items_over(batch["labels"], ctx.data_parallel_group, ctx.device)
        for i in range(2):
            with no_sync(model) if quiet and i == 0 else nullcontext():
                model(**shard_batch(batch, i, 2), num_items_in_batch=n).loss.backward()
            probe.setdefault("full", []).append(sum(b.allocated for b in buckets))
        probe["shard_dtypes"] = {b.shard_grad.dtype for b in buckets}
        probe["grads"] = sum(p.grad is not None for p in model.parameters())
        clip_grad_norm_(model.parameters(), 1.0, ctx)
        optimizer.step()
        probe["after_step"] = sum(b.allocated for b in buckets)
        probe["buckets"] = len(buckets)
        probe["params"] = {k: v.float() for k, v in snapshot(model).items()}
        out[quiet] = probe
    return out


def test_bf16_keeps_fp32_shards_and_both_accumulations_agree() -> None:
    for out in run_distributed(_mixed, 1, 1, 2, timeout=120):
        held, every = out[True], out[False]
        # no_sync: the fp32 buffers sum the first micro-batch (all held), the last frees them
        assert held["full"] == [held["buckets"], 0]
        assert every["full"] == [0, 0]  # every micro-batch reduce-scatters: never held past a backward
        for probe in (held, every):
            assert probe["shard_dtypes"] == {torch.float32} and probe["grads"] == 0 and probe["after_step"] == 0
        # fp32 sums either way (bf16 rounding happens only in the gathered parameters)
        for k in held["params"]:
            torch.testing.assert_close(held["params"][k], every["params"][k], rtol=0, atol=2 ** -7 * 4)


def _wide_masters(ctx: ParallelContext, zero_stage: int, quiet: bool) -> list[torch.Tensor]:
    """fp32 parameters with fp64 buckets (buffers that accumulate, as bf16's fp32 ones do), two
    micro-batches: the fp64 master shards after two steps."""
    spec = replace(SPEC, dtype=torch.float32, optimizer="sgd", lr=0.1, max_grad_norm=None)
    model = DataParallel(spec.build_model(), ctx, bucket_size_mb=BUCKET_MB, reduce_dtype=torch.float64,
                         zero_stage=zero_stage).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):
        n = count_items_over(batch["labels"], ctx.data_parallel_group, ctx.device)
        for i in range(2):
            with no_sync(model) if quiet and i == 0 else nullcontext():
                model(**shard_batch(batch, i, 2), num_items_in_batch=n).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [s.detach().clone() for s in optimizer.shards]


def _accumulations(ctx: ParallelContext) -> dict:
    return {(stage, quiet): _wide_masters(ctx, stage, quiet) for stage in (1, 2) for quiet in (True, False)}


def test_accumulating_every_micro_batch_equals_no_sync_in_wide_buffers() -> None:
    # Each micro-batch reduce-scattered and its shard carried, or summed locally and reduced once:
    # the same fp64 sums in another order, so the fp64 masters agree within PARALLEL.
    for out in run_distributed(_accumulations, 1, 1, 2, timeout=120):
        reference = out[(1, True)]
        for key, masters in out.items():
            for got, want in zip(masters, reference):
                torch.testing.assert_close(got, want, rtol=PARALLEL.rtol, atol=PARALLEL.atol, msg=str(key))


def _refusals(ctx: ParallelContext) -> list[str]:
    errors = []
    for stage in (0, 4, True):
        try:
            DataParallel(nn.Linear(2, 2).double(), ctx, zero_stage=stage)
        except ValueError as e:
            errors.append(str(e))
    model = DataParallel(nn.Linear(4, 4).double(), ctx, zero_stage=2).parallelize()
    torch.optim.SGD(model.parameters(), lr=0.1)  # a plain optimizer: nothing shards the gradients
    try:
        model(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    except ValueError as e:
        errors.append(str(e))
    return errors


def test_bad_zero_stage_and_a_plain_optimizer_are_refused_on_every_rank() -> None:
    for errors in run_distributed(_refusals, 1, 1, 2, timeout=60):
        assert errors[:3] == [f"zero_stage must be 1, 2 or 3, got {s!r}" for s in (0, 4, True)]
        assert len(errors) == 4 and "DistributedOptimizer" in errors[3]


def _reduced_twice(ctx: ParallelContext) -> RunResult:
    """The planted bug: one bucket's gradients reduce-scattered into its shard twice."""
    wait = Bucket.wait

    def twice(bucket: Bucket) -> None:
        if bucket.work is None or bucket is not reducer_of(model).buckets[1]:
            wait(bucket)
            return
        full = bucket.grad.clone()  # the local gradients, before the buffer is released
        wait(bucket)
        again = torch.empty_like(bucket.shard_grad)
        reduce_scatter_flat(again, full, group=bucket.group)
        bucket.shard_grad.add_(again)

    model = None

    def build(m: nn.Module) -> nn.Module:
        nonlocal model
        model = DataParallel(m, ctx, bucket_size_mb=BUCKET_MB, zero_stage=2).parallelize()
        return model

    Bucket.wait = twice  # type: ignore[method-assign]
    try:
        return _train_built(ctx, build)
    finally:
        Bucket.wait = wait  # type: ignore[method-assign]


def _train_built(ctx: ParallelContext, build) -> RunResult:
    spec = replace(SPEC, optimizer="sgd", max_grad_norm=None)
    model = build(spec.build_model())
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    losses = []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return RunResult(losses, snapshot(model))


def test_planted_bug_a_bucket_reduced_twice_is_caught() -> None:
    reference = reference_run(replace(SPEC, optimizer="sgd", max_grad_norm=None))
    for result in run_distributed(_reduced_twice, 1, 1, 2, timeout=60):
        with pytest.raises(AssertionError):
            assert_matches_reference(result, reference, PARALLEL)

