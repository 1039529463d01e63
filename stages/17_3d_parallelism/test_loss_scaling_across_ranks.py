"""Dynamic loss scaling across the grid: it changes no bit of training at any layout, and every rank
skips a step together (stage 02 is loss scaling on one device).

The parity runs are float64 with a scaler: the scale is a power of two, so the scaled backward
is the unscaled one times S in every operation, and unscaling divides S out exactly (EXACT).
"""

import functools
from typing import Any

import pytest
import torch

from goose_core import (DataParallel, DistributedOptimizer, GradScaler, ParallelContext, clip_grad_norm_,
                        full_state_dict)
from goose_core.metadata import grad_shards
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference, at_layout,
                                reference_run, run_distributed)

# AdamW with clipping: the norm and Adam's moments must see the unscaled gradients.
SPEC = TrainSpec(family="gpt2", steps=4, max_grad_norm=0.5)
GROWTH = 2  # growth_interval: the scale doubles after steps 2 and 4
# (tp, pp, dp, ZeRO-1): each axis alone, ZeRO-1 and plain DP over dp, and all at once.
LAYOUTS = [(2, 1, 1, False), (1, 2, 1, False), (1, 1, 2, False), (1, 1, 2, True), (2, 2, 2, True)]
pytestmark = pytest.mark.usefixtures("one_thread")  # the reference run in-process, as the ranks run


def _build(ctx: ParallelContext, spec: TrainSpec, zero: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = at_layout(spec.build_model(), ctx, num_microbatches=2)  # GPipe
    optimizer = spec.build_optimizer(model.parameters())
    return model, DistributedOptimizer(optimizer, ctx) if zero else optimizer


def _step(ctx: ParallelContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          scaler: GradScaler | None, batch: dict, spec: TrainSpec, inject: bool = False) -> float:
    """One step in the documented order: scale -> backward -> unscale_ -> clip -> step -> update."""
    loss = model(**batch).loss
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if inject:
        _inject_inf(model)
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def _train(ctx: ParallelContext, spec: TrainSpec, zero: bool, scaled: bool) -> tuple[RunResult, list[float]]:
    model, optimizer = _build(ctx, spec, zero)
    scaler = GradScaler(ctx, growth_interval=GROWTH) if scaled else None
    losses, scales = [], []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):
        losses.append(_step(ctx, model, optimizer, scaler, batch, spec))
        scales.append(scaler.get_scale() if scaler is not None else 1.0)
    return RunResult(losses, full_state_dict(model, ctx)), scales


def _scaled_and_unscaled(ctx: ParallelContext, spec: TrainSpec, zero: bool) -> tuple:
    return _train(ctx, spec, zero, scaled=False), _train(ctx, spec, zero, scaled=True)


@functools.cache
def _reference() -> RunResult:
    return reference_run(SPEC)


@pytest.mark.parametrize("tp, pp, dp, zero", LAYOUTS)
def test_scaled_run_equals_unscaled_run_exactly_and_the_scale_grows(tp: int, pp: int, dp: int, zero: bool) -> None:
    reference = _reference()
    for rank, ((plain, _), (scaled, scales)) in enumerate(
            run_distributed(_scaled_and_unscaled, tp, pp, dp, SPEC, zero, timeout=180)):
        assert_matches_reference(scaled, plain, EXACT)
        assert_matches_reference(scaled, reference, PARALLEL)
        assert scales == [2.0**16, 2.0**17, 2.0**17, 2.0**18], f"rank {rank}: {scales}"


# -- an inf on one rank -----------------------------------------------------------------------
INF_RANK = 5  # tp 1, pp 1, dp 0 of 2 x 2 x 2: the other tp rank, stage and dp replica must skip too


def _inject_inf(model: torch.nn.Module) -> None:
    """One element of one gradient on this rank becomes inf, after every gradient sync: under
    ZeRO-1 in this rank's reduced shard (asking for it reduce-scatters), else in ``p.grad``."""
    p = next(p for p in model.parameters() if p.requires_grad)
    shards = grad_shards(p)
    target = shards()[0] if shards is not None else p
    target.grad.view(-1)[0] = float("inf")


def _state(optimizer: torch.optim.Optimizer) -> dict[Any, dict[str, torch.Tensor]]:
    inner = optimizer.state_dict()
    inner = inner.get("optimizer", inner)  # a ZeRO-1 shard dict wraps the inner optimizer's
    return {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in inner["state"].items()}


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(torch.as_tensor(a[k][n]), torch.as_tensor(b[k][n]))
                                           for n in a[k]) for k in a)


def _skip_on_one_inf(ctx: ParallelContext, spec: TrainSpec, zero: bool) -> dict:
    model, optimizer = _build(ctx, spec, zero)
    scaler = GradScaler(ctx)
    batches = list(spec.batches(ctx.dp_rank, ctx.dp_size))
    _step(ctx, model, optimizer, scaler, batches[0], spec)  # Adam state exists from here on
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = _state(optimizer)
    _step(ctx, model, optimizer, scaler, batches[1], spec, inject=ctx.rank == INF_RANK)
    unchanged = (all(torch.equal(params[n], p) for n, p in model.named_parameters())
                 and _equal_states(state, _state(optimizer)))
    after_skip = scaler.get_scale()
    _step(ctx, model, optimizer, scaler, batches[2], spec)  # training goes on from the same point
    moved = not all(torch.equal(params[n], p) for n, p in model.named_parameters())
    return {"unchanged": unchanged, "scales": [after_skip, scaler.get_scale()], "moved": moved}


@pytest.mark.parametrize("zero", [False, True], ids=["dp", "zero1"])
def test_an_inf_on_one_rank_skips_the_step_on_every_rank(zero: bool) -> None:
    spec = TrainSpec(family="gpt2", steps=3, max_grad_norm=0.5)
    for rank, got in enumerate(run_distributed(_skip_on_one_inf, 2, 2, 2, spec, zero, timeout=180)):
        assert got["unchanged"], f"rank {rank}: a parameter or the optimizer state changed in the skipped step"
        assert got["scales"] == [2.0**15, 2.0**15], f"rank {rank}: {got['scales']}"  # halved, then kept
        assert got["moved"], f"rank {rank}: the step after the skip did not train"


# -- real fp16 --------------------------------------------------------------------------------
def _fp16(ctx: ParallelContext, spec: TrainSpec) -> tuple[list[float], list[float]]:
    """fp32 parameters, fp16 autocast (torch's AMP recipe), a scale far too large to start."""
    model, optimizer = _build(ctx, spec, zero=True)
    scaler = GradScaler(ctx, init_scale=2.0**24, growth_interval=3)
    losses, scales = [], []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    return losses, scales


def test_fp16_autocast_backs_off_from_overflow_together_then_trains() -> None:
    spec = TrainSpec(family="gpt2", steps=10, dtype=torch.float32, max_grad_norm=1.0)
    results = run_distributed(_fp16, 1, 2, 2, spec, timeout=180)
    losses, scales = results[0]
    for rank, (_, theirs) in enumerate(results):
        assert theirs == scales, f"rank {rank} scales {theirs}, rank 0 {scales}"
    skipped = [i for i in range(1, len(scales)) if scales[i] < scales[i - 1]]
    assert scales[0] == 2.0**23 and skipped, scales  # 2**24 overflows fp16's 65504
    assert scales[-1] >= 2.0**10 and all(map(torch.isfinite, torch.tensor(losses))), (scales, losses)
    assert losses[-1] < losses[0] - 0.2, losses  # the steps that ran trained the model


# -- fp16 parameters with fp32 master weights (Megatron's fp16 recipe) -------------------------


def _fp16_masters(ctx: ParallelContext, spec: TrainSpec) -> dict:
    model = DataParallel(spec.build_model(), ctx).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    scaler = GradScaler(ctx, growth_interval=3)
    losses, scales = [], []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):
        losses.append(_step(ctx, model, optimizer, scaler, batch, spec))
        scales.append(scaler.get_scale())
    masters = {p.dtype for g in optimizer.param_groups for p in g["params"]}
    return {"losses": losses, "scales": scales, "masters": masters, "params": {p.dtype for p in model.parameters()}}


def test_fp16_parameters_with_zero1_fp32_masters() -> None:
    spec = TrainSpec(family="gpt2", steps=8, dtype=torch.float16, max_grad_norm=1.0)
    results = run_distributed(_fp16_masters, 1, 1, 2, spec, timeout=180)
    for rank, got in enumerate(results):
        assert got["params"] == {torch.float16} and got["masters"] == {torch.float32}, (rank, got)
        assert got["scales"] == results[0]["scales"], f"rank {rank}: {got['scales']}"
        assert got["losses"][-1] < got["losses"][0] - 0.3, got["losses"]
