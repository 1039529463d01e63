"""Unit tests of DistributedOptimizer: param groups, LR schedulers, zero_grad, clear errors, and
weights written between steps."""

import copy
import functools
from dataclasses import replace

import pytest
import torch
from torch import nn

from goose_core import DataParallel, DistributedOptimizer, ParallelContext
from goose_core.data import shard_batch
from goose_core.data_parallel import broadcast_replicas, no_sync
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference, run_distributed,
                                snapshot, train_loop)

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


# -- weights written between steps ------------------------------------------------------------
def _write(model: nn.Module, ctx: ParallelContext) -> None:
    """Every parameter doubled (exact in any dtype; every element but zeros changes), three
    ways: ``p.copy_`` on every rank (autograd's version counter moves), ``.data`` (it does
    not), and on dp rank 0 only, then ``broadcast_replicas`` (a collective: the other ranks'
    counters do not move)."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if i % 3 == 0:
                p.copy_(2 * p)
            elif i % 3 == 1:
                p.data.mul_(2)
            elif ctx.dp_rank == 0:
                p.mul_(2)
    broadcast_replicas(model, ctx.data_parallel_group)


def _zero(ctx: ParallelContext, spec: TrainSpec, params: list[torch.Tensor] | None = None,
          state: dict | None = None) -> tuple[nn.Module, DistributedOptimizer]:
    model = DataParallel(spec.build_model(), ctx, bucket_size_mb=0.05).parallelize()  # several buckets
    if params is not None:
        with torch.no_grad():
            for p, value in zip(model.parameters(), params):
                p.copy_(value)
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    if state is not None:
        optimizer.load_state_dict({k: v for k, v in state.items() if k != "master_weights"})
    return model, optimizer


def _two_steps(model: nn.Module, optimizer: DistributedOptimizer, ctx: ParallelContext,
               spec: TrainSpec) -> tuple[dict, RunResult]:
    """A step at lr=0 (the weights after it), then one at the spec's lr."""
    batches = [shard_batch(spec.batch(s), ctx.dp_rank, ctx.dp_size) for s in (1, 2)]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    losses = train_loop(model, optimizer, batches[:1])
    still = snapshot(model)
    for group in optimizer.param_groups:
        group["lr"] = spec.lr
    losses += train_loop(model, optimizer, batches[1:])
    return still, RunResult(losses, snapshot(model))


def _written_between_steps(ctx: ParallelContext, spec: TrainSpec) -> dict:
    """A step, the weights written (:func:`_write`), two steps; and the twin built on the
    written weights, with the same optimizer state, taking the same two steps."""
    model, optimizer = _zero(ctx, spec)
    train_loop(model, optimizer, [shard_batch(spec.batch(0), ctx.dp_rank, ctx.dp_size)])
    state = copy.deepcopy(optimizer.state_dict())  # its tensors are the ones the next steps update
    _write(model, ctx)
    written = snapshot(model)
    still, run = _two_steps(model, optimizer, ctx, spec)
    twin = _two_steps(*_zero(ctx, spec, list(written.values()), state), ctx, spec)[1]
    _write(model, ctx)  # and saved without a step: a save's masters are those of its weights
    masters = optimizer.consolidated_state_dict().get("master_weights", {})
    saved = all(torch.equal(masters[i], p.float()) for i, p in enumerate(model.parameters())) if masters else None
    return {"written": written, "still": still, "run": run, "twin": twin, "saved": saved}


@pytest.mark.parametrize("spec", [SPEC, replace(SPEC, lr=0.1, precision="bf16")], ids=["fp64", "bf16-masters"])
def test_weights_written_between_steps_are_where_the_next_step_starts(spec: TrainSpec) -> None:
    """Whichever way the weights were written, an lr=0 step keeps them bit for bit and the next
    step equals that of an optimizer built on them (EXACT: ZeRO-1 at dp=2 both); under bf16 the
    fp32 master shards take the written values, in a save without a step between too."""
    for rank, r in enumerate(run_distributed(_written_between_steps, 1, 1, 2, spec, timeout=120)):
        moved = [n for n, t in r["written"].items() if not torch.equal(t, r["still"][n])]
        assert not moved, f"rank {rank}: an lr=0 step changed {len(moved)} written parameters (first {moved[0]})"
        try:
            assert_matches_reference(r["run"], r["twin"], EXACT)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err
        assert r["saved"] is (None if spec.precision == "full" else True), f"rank {rank}: saved stale masters"


def _last_write(ctx: ParallelContext, spec: TrainSpec) -> list[bool]:
    """Saved master shards loaded over other weights, then an lr=0 step; loaded again, the
    weights written (:func:`_write`), an lr=0 step."""
    model, optimizer = _zero(ctx, spec)
    train_loop(model, optimizer, [shard_batch(spec.batch(0), ctx.dp_rank, ctx.dp_size)])
    saved, trained = copy.deepcopy(optimizer.state_dict()), snapshot(model)
    fresh, again = _zero(ctx, spec)
    kept = []
    for write in (False, True):
        again.load_state_dict(saved)
        if write:
            _write(fresh, ctx)
        expected = snapshot(fresh) if write else trained
        _two_steps(fresh, again, ctx, replace(spec, lr=0.0))
        kept.append(all(torch.equal(t, expected[n]) for n, t in snapshot(fresh).items()))
    return kept


def test_saved_masters_and_weights_loaded_the_last_write_wins() -> None:
    """bf16 ZeRO-1 at dp=2: loaded master shards are what the step writes over weights loaded
    before them; weights written after them are what it keeps."""
    spec = replace(SPEC, lr=0.1, precision="bf16")
    for rank, kept in enumerate(run_distributed(_last_write, 1, 1, 2, spec, timeout=120)):
        assert kept == [True, True], f"rank {rank}: kept the loaded masters, the weights written after: {kept}"
