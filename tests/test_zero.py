"""Unit tests of DistributedOptimizer: param groups, LR schedulers, zero_grad, clear errors."""

import functools

import pytest
import torch
from torch import nn

from goose_core import DataParallel, DistributedOptimizer, ParallelContext
from goose_core.data import shard_batch
from goose_core.data_parallel import no_sync
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, run_distributed, snapshot, train_loop

SPEC = TrainSpec(family="gpt2", steps=3, optimizer="sgd")


def _groups(model: nn.Module) -> list[dict]:
    """Two groups with their own options: no weight decay and a higher lr for biases and norms."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}]


def _run(ctx: ParallelContext | None) -> tuple[RunResult, list[list[float]]]:
    model = SPEC.build_model()
    if ctx is not None:
        model = DataParallel(model, ctx, bucket_size_mb=0.05).parallelize()
    optimizer = torch.optim.SGD(_groups(model), lr=1e-3, momentum=0.9)
    if ctx is not None:
        optimizer = DistributedOptimizer(optimizer, ctx)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    losses, lrs = [], []
    for step in range(SPEC.steps):
        batch = SPEC.batch(step)
        if ctx is not None:
            batch = shard_batch(batch, ctx.dp_rank, ctx.dp_size)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        losses.append(loss.item())
        lrs.append([g["lr"] for g in optimizer.param_groups])
    return RunResult(losses, snapshot(model)), lrs


def test_param_groups_options_and_lr_scheduler_match_the_plain_optimizer() -> None:
    reference, reference_lrs = _run(None)
    for result, lrs in run_distributed(_run, 1, 1, 2, timeout=60):
        assert_matches_reference(result, reference, PARALLEL)
        assert lrs == reference_lrs == [[5e-4, 1.5e-3], [2.5e-4, 7.5e-4], [1.25e-4, 3.75e-4]]


def _errors(ctx: ParallelContext) -> list[str]:
    model = nn.Linear(4, 4)
    messages = []
    used = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    used.step()
    for make in (lambda: DistributedOptimizer(used, ctx),
                 lambda: DistributedOptimizer(object(), ctx),  # type: ignore[arg-type]
                 lambda: DistributedOptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1), ctx)
                 .add_param_group({"params": []})):
        with pytest.raises(ValueError) as err:
            make()
        messages.append(str(err.value))
    mine = DistributedOptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1), ctx)
    other = mine.state_dict() | {"zero1_shard": 1 - ctx.dp_rank}
    with pytest.raises(ValueError) as err:
        mine.load_state_dict(other)
    messages.append(str(err.value))
    return messages


def test_misuse_is_a_clear_error_on_every_rank() -> None:
    for messages in run_distributed(_errors, 1, 1, 2, timeout=60):
        assert "wrap a fresh optimizer" in messages[0]
        assert "wraps a torch.optim.Optimizer, got object" in messages[1]
        assert "cannot add param groups" in messages[2]
        assert "consolidated_state_dict() to change layouts" in messages[3]


def _accumulate(ctx: ParallelContext | None, use_no_sync: bool) -> RunResult:
    """Two micro-batches per step; ZeRO-1 under DataParallel, with and without no_sync."""
    model = SPEC.build_model()
    if ctx is not None:
        model = DataParallel(model, ctx).parallelize()
    optimizer = SPEC.build_optimizer(model.parameters())
    if ctx is not None:
        optimizer = DistributedOptimizer(optimizer, ctx)
    batches = SPEC.batches() if ctx is None else SPEC.batches(ctx.dp_rank, ctx.dp_size)
    quiet = functools.partial(no_sync, model) if ctx is not None and use_no_sync else None
    return RunResult(train_loop(model, optimizer, batches, micro_batches=2, no_sync=quiet), snapshot(model))


def _both(ctx: ParallelContext) -> list[RunResult]:
    return [_accumulate(ctx, True), _accumulate(ctx, False)]


def test_accumulation_with_and_without_no_sync() -> None:
    reference = _accumulate(None, False)
    for results in run_distributed(_both, 1, 1, 2, timeout=60):
        for result in results:
            assert_matches_reference(result, reference, PARALLEL)


def test_master_weight_keepers_refuse_each_other() -> None:
    # Both keep fp32 masters of their own: one wrapping the other would keep them twice.
    from goose_core.optim import MasterWeights

    params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    masters = MasterWeights(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="master shards itself: give it the plain optimizer, not MasterWeights"):
        DistributedOptimizer(masters, ctx=None)  # refused before the context is used
    with pytest.raises(ValueError, match="MasterWeights wraps a plain optimizer, got a MasterWeights"):
        MasterWeights(masters)
