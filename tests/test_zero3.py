"""ZeRO-3 (DataParallel(zero_stage=3)) at dp alone: equal to the single-device run, holding 1/dp of
the parameters between steps, and the bugs it could have.

Each spawned group checks several cases (the suite runs three times on two cores): dp=2 and 4
with accumulation, padding, clipping, a frozen block, GPT-2's tied embedding and 🤗's activation
checkpointing; the bytes held and the collectives of a step, exactly; the prefetch timeline; a
parameter some ranks do not use; fp16 with GradScaler bit-equal to ZeRO-1; bf16 within the
one-device recipe's noise floor; three planted bugs. tests/test_zero3_composition.py composes it
with TP, PP and checkpoints.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
import torch
from torch import nn

from goose_core import DataParallel, DistributedOptimizer, ParallelContext, clip_grad_norm_
from goose_core.data import shard_batch
from goose_core.data_parallel import no_sync, zero3
from goose_core.amp import GradScaler
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference,
                                noise_floor_runs, noise_floor_tolerances, reference_run, run_distributed,
                                snapshot, train_loop)

LLAMA = TrainSpec(family="llama", steps=3, max_grad_norm=0.5)
# GPT-2 (wte tied to lm_head) on right-padded rows, SGD so a wrong gradient scale shows.
GPT2 = TrainSpec(family="gpt2", steps=3, optimizer="sgd", lr=0.1, padding="right", seed=1, max_grad_norm=0.5)
BF16 = TrainSpec(family="llama", steps=4, optimizer="sgd", lr=0.1, precision="bf16")
M = 2  # micro-batches: accumulation by hand under DP, the pipeline's under PP


def _freeze(model: nn.Module) -> nn.Module:
    """GPT-2's first block's MLP frozen: left whole on every rank, no gradient, not stepped."""
    for p in model.transformer.h[0].mlp.parameters():
        p.requires_grad_(False)
    return model


def _reference(spec: TrainSpec, frozen: bool = False, micro_batches: int = 1) -> RunResult:
    model = spec.build_model()
    if frozen:
        _freeze(model)
    optimizer = spec.recipe_optimizer(model.parameters())
    clip = functools.partial(torch.nn.utils.clip_grad_norm_, list(model.parameters()), spec.max_grad_norm)
    losses = train_loop(model, optimizer, (spec.batch(s) for s in range(spec.steps)),
                        clip if spec.max_grad_norm else None, micro_batches)
    return RunResult(losses, snapshot(model))


Wrap = Callable[[nn.Module, ParallelContext], nn.Module]


def _build(ctx: ParallelContext, spec: TrainSpec, frozen: bool = False, stage: int = 3,
           before_dp: Wrap | None = None) -> tuple[nn.Module, DistributedOptimizer]:
    """``spec``'s model under ``before_dp`` (the other wrappers), then DP at ZeRO ``stage``."""
    model = spec.build_model()
    if frozen:
        _freeze(model)
    if before_dp is not None:
        model = before_dp(model, ctx)
    model = DataParallel(model, ctx, zero_stage=stage).parallelize()
    return model, DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)


def _train(ctx: ParallelContext, model: nn.Module, optimizer: Any, spec: TrainSpec, steps: range,
           micro_batches: int = 1) -> list[float]:
    clip = functools.partial(clip_grad_norm_, list(model.parameters()), spec.max_grad_norm, ctx)
    batches = (shard_batch(spec.batch(s), ctx.dp_rank, ctx.dp_size) for s in steps)
    return train_loop(model, optimizer, batches, clip if spec.max_grad_norm else None, micro_batches,
                      no_sync=functools.partial(no_sync, model) if micro_batches > 1 else None)


def _whole(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """The parameters by name, gathered over dp (no tp or pp here: full_state_dict's job)."""
    with zero3.gathered(model):
        return snapshot(model)


def _run(ctx: ParallelContext, spec: TrainSpec, frozen: bool = False, micro_batches: int = 1,
         before_dp: Wrap | None = None, whole: Callable[..., dict[str, torch.Tensor]] = _whole) -> RunResult:
    model, optimizer = _build(ctx, spec, frozen, before_dp=before_dp)
    losses = _train(ctx, model, optimizer, spec, range(spec.steps), micro_batches)
    return RunResult(losses, whole(model, ctx))


# -- dp = 2 and 4 -----------------------------------------------------------------------------------
def _held(ctx: ParallelContext) -> tuple[int, int, bool]:
    """(bytes the rank holds for parameters between steps, the formula's, whether every trainable
    parameter is empty then): per unit (a block, or the rest) ceil(trainable numel / dp)
    elements, plus the frozen parameters whole."""
    model, optimizer = _build(ctx, GPT2, frozen=True)
    _train(ctx, model, optimizer, GPT2, range(1))
    with torch.no_grad():  # an evaluation forward gathers and frees as well
        model(**shard_batch(GPT2.batch(1), ctx.dp_rank, ctx.dp_size))
    empty = all(p.untyped_storage().nbytes() == 0 for p in model.parameters() if p.requires_grad)
    with zero3.gathered(model):  # the whole model's sizes
        blocks = [sum(p.numel() for p in block.parameters() if p.requires_grad) for block in model.transformer.h]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    units = [*blocks, trainable - sum(blocks)]
    formula = (sum(-(-n // ctx.dp_size) for n in units) + frozen) * 8  # float64
    return zero3.parameter_bytes(model), formula, empty


def _collectives(ctx: ParallelContext) -> tuple[dict[str, int], dict[str, int]]:
    """The all-gathers and reduce-scatters of one training step, and the bytes each rank sends in
    them, counted (``got``) and by the formula (``want``): a block is gathered twice and its padded
    gradient reduce-scattered once, the rest gathered once; a rank sends its shard to each of the
    other dp - 1 ranks in an all-gather, and (dp - 1) / dp of the padded buffer in a reduce-scatter
    (the ring algorithms' bytes)."""
    model, optimizer = _build(ctx, LLAMA)
    dp = ctx.dp_size
    got = {"all_gather": 0, "reduce_scatter": 0, "bytes": 0}

    def counting(name: str, collective: Callable[..., Any]) -> Callable[..., Any]:
        def call(output: torch.Tensor, input: torch.Tensor, **kwargs: Any) -> Any:
            got[name] += 1
            full = output if name == "all_gather" else input  # the padded flat buffer
            got["bytes"] += full.numel() * full.element_size() * (dp - 1) // dp
            return collective(output, input, **kwargs)
        return call

    with mock.patch.object(zero3, "all_gather_flat", counting("all_gather", zero3.all_gather_flat)), \
            mock.patch.object(zero3, "reduce_scatter_flat", counting("reduce_scatter", zero3.reduce_scatter_flat)):
        _train(ctx, model, optimizer, LLAMA, range(1))
    with zero3.gathered(model):  # the whole model's sizes
        blocks = [sum(p.numel() for p in block.parameters()) for block in model.model.layers]
        rest = sum(p.numel() for p in model.parameters()) - sum(blocks)
    padded = [-(-n // dp) * dp for n in blocks]
    rest_padded = -(-rest // dp) * dp
    elements = 2 * sum(padded) + rest_padded + sum(padded) + rest_padded  # gathers, then reduce-scatters
    want = {"all_gather": 2 * len(blocks) + 1, "reduce_scatter": len(blocks) + 1,
            "bytes": elements * 8 * (dp - 1) // dp}  # float64
    return got, want


def _timeline(ctx: ParallelContext) -> dict[str, list[tuple[int, list[Any]]]]:
    """Every block unit's state when block k's forward computes (its first submodule's pre-hook),
    and just after the gradient reaches block k's output, with which blocks hold a whole gradient."""
    model, optimizer = _build(ctx, LLAMA)
    sync = zero3.sync_of(model)
    assert sync is not None
    blocks = sync.units[:-1]
    seen: dict[str, list[tuple[int, list[Any]]]] = {"forward": [], "backward": [], "gradients": []}
    for k, block in enumerate(model.model.layers):
        first = next(iter(block.children()))
        first.register_forward_pre_hook(lambda m, a, k=k: seen["forward"].append((k, [u.state for u in blocks])))
    before_backward = zero3.ShardedParameters._before_backward

    def recording(self: zero3.ShardedParameters, unit: zero3.Unit, before: zero3.Unit | None) -> None:
        before_backward(self, unit, before)
        seen["backward"].append((blocks.index(unit), [u.state for u in blocks]))
        seen["gradients"].append((blocks.index(unit), [u.buckets[0].full_grad is not None for u in blocks]))

    with mock.patch.object(zero3.ShardedParameters, "_before_backward", recording):
        _train(ctx, model, optimizer, LLAMA, range(1))
    return seen


def _checkpointed(reentrant: bool) -> Wrap:
    """🤗's activation checkpointing on every block: the recomputed forward (in the backward, after
    the block was freed) gathers it again, and it stays until its reduce-scatter."""
    def wrap(model: nn.Module, ctx: ParallelContext) -> nn.Module:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return model
    return wrap


def _gathered_bytes(ctx: ParallelContext) -> dict[str, Any]:
    """The bytes of gathered parameter storage alive after each block's forward and after the
    whole forward (a bucket's buffer, or the storage of a parameter or parameter view autograd
    saved), what the schedule keeps (after block k: the rest and block k+1, prefetched; after the
    forward: the rest only), and the bytes of every other storage autograd saved (activations)."""
    model, _ = _build(ctx, LLAMA)
    sync = zero3.sync_of(model)
    assert sync is not None
    saved: list[torch.Tensor] = []

    def held() -> tuple[int, int]:
        params, activations = {}, {}  # by storage (its address moves when resized)
        for t in saved:
            of_param = isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)
            (params if of_param else activations)[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        params.update({b.full.untyped_storage()._cdata: b.full.untyped_storage().nbytes() for b in sync.buckets})
        return sum(params.values()), sum(activations.values())

    unit_bytes = [sum(b.padded_numel * b.full.element_size() for b in u.buckets) for u in sync.units]
    kept = [unit_bytes[-1] + (unit_bytes[k + 1] if k + 2 < len(unit_bytes) else 0)
            for k in range(len(unit_bytes) - 1)]
    after_block: list[tuple[int, int]] = []
    for k, block in enumerate(model.model.layers):  # registered after DataParallel's: run after its release
        block.register_forward_hook(lambda m, a, o, k=k: after_block.append((held()[0], kept[k])))
    batch = shard_batch(LLAMA.batch(0), ctx.dp_rank, ctx.dp_size)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(**batch).loss
    params, activations = held()
    loss.backward()
    return {"after_block": after_block, "after_forward": (params, unit_bytes[-1]), "activations": activations}


def _data_parallel(ctx: ParallelContext) -> dict[str, Any]:
    return {"gathered": _gathered_bytes(ctx), "llama": _run(ctx, LLAMA),
            "gpt2": _run(ctx, GPT2, frozen=True, micro_batches=M),
            "checkpointed": [_run(ctx, LLAMA, before_dp=_checkpointed(r)) for r in (False, True)],
            "held": _held(ctx), "collectives": _collectives(ctx), "timeline": _timeline(ctx)}


def _check_timeline(seen: dict[str, list[tuple[int, list[Any]]]]) -> None:
    """Block k computes whole, block k+1's gather in flight (or done), every other block freed;
    the backward the same, mirrored (block k-1 prefetched; k+1 may still be reducing)."""
    free, whole = zero3.Unit.FREE, zero3.Unit.GATHERED
    blocks = len(seen["forward"])
    assert [k for k, _ in seen["forward"]] == list(range(blocks))
    assert [k for k, _ in seen["backward"]] == list(reversed(range(blocks)))
    for k, states in seen["forward"]:
        assert states[k] == whole and all(s == free for s in states[:k]), (k, states)
        assert k + 1 == blocks or states[k + 1] != free, f"block {k + 1} not prefetched: {states}"
        assert all(s == free for s in states[k + 2:]), (k, states)
    for k, states in seen["backward"]:
        assert states[k] == whole and all(s == free for s in states[k + 2:]), (k, states)
        assert k == 0 or states[k - 1] != free, f"block {k - 1} not prefetched: {states}"
        assert all(s == free for s in states[:max(k - 1, 0)]), (k, states)
    for k, held in seen["gradients"]:  # whole gradients: block k+1 filling, k+2 in flight, no other
        assert not any(held[:k + 1]) and not any(held[k + 3:]), (k, held)


def _check_gathered(found: dict[str, Any], rank: int) -> None:
    for k, (got, want) in enumerate(found["after_block"]):
        assert got == want, (f"rank {rank}: after block {k}'s forward {got} bytes of gathered parameters, "
                             f"kept {want}")
    got, want = found["after_forward"]
    assert got == want, f"rank {rank}: after the forward {got} bytes of gathered parameters, the rest's {want}"


@pytest.mark.parametrize("dp", [2, 4])
def test_data_parallel_equals_one_device_and_holds_one_dp_th_of_the_parameters(dp: int) -> None:
    llama, gpt2 = reference_run(LLAMA), _reference(GPT2, frozen=True, micro_batches=M)
    for rank, found in enumerate(run_distributed(_data_parallel, 1, 1, dp, timeout=120)):
        assert_matches_reference(found["llama"], llama, PARALLEL)
        assert_matches_reference(found["gpt2"], gpt2, PARALLEL)
        for result in found["checkpointed"]:
            assert_matches_reference(result, llama, PARALLEL)
        held, formula, empty = found["held"]
        assert empty, f"rank {rank}: a trainable parameter stays whole between steps"
        assert held == formula, f"rank {rank}: holds {held} bytes of parameters, the formula {formula}"
        got, want = found["collectives"]
        assert got == want, f"rank {rank}: one step's collectives {got}, the formula's {want}"
        _check_timeline(found["timeline"])
        _check_gathered(found["gathered"], rank)


# -- a parameter some ranks do not use ------------------------------------------------------------
class _Sometimes(nn.Module):
    """An MLP plus a parameter used only when the input's first element is positive (as an
    expert a rank's tokens may not reach): its gradient, 0 where used, is missing elsewhere."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp
        self.extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.used: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.used.append(bool(x[0, 0, 0] > 0))
        return self.mlp(x) + 0 * self.extra.sum() if self.used[-1] else self.mlp(x)


UNEVEN = replace(LLAMA, optimizer="sgd", weight_decay=0.0, max_grad_norm=None, steps=4)


def _uneven(model: nn.Module, ctx: ParallelContext | None = None) -> nn.Module:
    model.model.layers[2].mlp = _Sometimes(model.model.layers[2].mlp)
    return model


def _uneven_run(ctx: ParallelContext) -> tuple[RunResult, list[bool]]:
    model, optimizer = _build(ctx, UNEVEN, before_dp=_uneven)
    losses = _train(ctx, model, optimizer, UNEVEN, range(UNEVEN.steps))
    return RunResult(losses, _whole(model, ctx)), model.model.layers[2].mlp.used


def test_a_parameter_unused_on_some_ranks_keeps_every_rank_s_collectives_in_step() -> None:
    # Each block's reduce-scatter starts when the gradient reaches the block's input, a point of
    # the graph every rank passes alike, not when its last gradient arrives (never, for a
    # parameter this rank did not use): the ranks' collectives stay in one order.
    model = _uneven(UNEVEN.build_model())
    optimizer = UNEVEN.build_optimizer(model.parameters())
    reference = RunResult(train_loop(model, optimizer, (UNEVEN.batch(s) for s in range(UNEVEN.steps))),
                          snapshot(model))
    found = run_distributed(_uneven_run, 1, 1, 2, timeout=60)
    assert any(a != b for a, b in zip(found[0][1], found[1][1])), "no step where one rank used it and the other not"
    for result, _ in found:
        assert_matches_reference(result, reference, PARALLEL)


# -- planted bugs ---------------------------------------------------------------------------------
def _planted(ctx: ParallelContext, bug: str) -> RunResult | str | dict[str, Any]:
    spec = replace(LLAMA, optimizer="sgd", max_grad_norm=None)
    if bug == "not re-gathered for backward":
        patch = mock.patch.object(zero3.ShardedParameters, "_before_backward", lambda self, unit, before: None)
    elif bug == "a shard reduced twice":
        finish = zero3.ShardedBucket.finish_reduce

        def twice(self: zero3.ShardedBucket, group: Any, dp: int) -> None:
            received = self.received
            finish(self, group, dp)
            self.shard_grad.add_(received)  # this rank's piece of the sum added a second time

        patch = mock.patch.object(zero3.ShardedBucket, "finish_reduce", twice)
    elif bug in ("released by swapping p.data", "released without freeing the storage"):
        def swap(self: zero3.ShardedBucket) -> None:  # a new, empty buffer: the saved views keep the old
            self.full = torch.empty(self.padded_numel, dtype=self.full.dtype, device=self.full.device)
            self._point()
            self.full.untyped_storage().resize_(0)

        with mock.patch.object(zero3.ShardedBucket, "release", swap if "swapping" in bug else lambda self: None):
            return _gathered_bytes(ctx)
    else:
        patch = mock.patch.object(zero3.ShardedBucket, "shard_range",  # every rank takes shard 0
                                  lambda self, rank: (0, self.shard_numel))
    with patch:
        try:
            return _run(ctx, spec)
        except RuntimeError as err:  # the backward met a freed parameter: every rank raises alike
            return str(err)


@pytest.mark.parametrize("bug", ["not re-gathered for backward", "a shard reduced twice", "the wrong shard written",
                                 "released by swapping p.data",
                                 "released without freeing the storage"])
def test_a_planted_bug_fails(bug: str) -> None:
    reference = reference_run(replace(LLAMA, optimizer="sgd", max_grad_norm=None))
    for rank, found in enumerate(run_distributed(_planted, 1, 1, 2, bug, timeout=120)):
        if isinstance(found, dict):  # gathered buffers outlive their block's forward
            with pytest.raises(AssertionError, match="bytes of gathered parameters"):
                _check_gathered(found, rank)
            continue
        if isinstance(found, str):
            assert "not allocated" in found or "storage of size 0" in found, found  # its storage freed
            continue
        with pytest.raises(AssertionError, match="differ"):
            assert_matches_reference(found, reference, PARALLEL)


def test_without_it_the_same_run_passes() -> None:
    spec = replace(LLAMA, optimizer="sgd", max_grad_norm=None)
    reference = reference_run(spec)
    for found in run_distributed(_run, 1, 1, 2, spec, timeout=120):
        assert_matches_reference(found, reference, PARALLEL)


# -- fp16 with loss scaling -------------------------------------------------------------------------
# No clipping here: the norm sums its per-bucket pieces, and ZeRO-1 and ZeRO-3 cut different
# buckets, so the clip coefficient's last bits differ (clipping is checked at PARALLEL above).
FP16 = TrainSpec(family="llama", steps=3, optimizer="sgd", lr=0.1, dtype=torch.float16)


def _fp16(ctx: ParallelContext, stage: int) -> RunResult:
    """fp16 weights, fp32 master shards, GradScaler: the loop of stage 02 at ZeRO ``stage``."""
    model, optimizer = _build(ctx, FP16, stage=stage)
    scaler = GradScaler(ctx, init_scale=2.0**10)
    losses = []
    for step in range(FP16.steps):
        loss = model(**shard_batch(FP16.batch(step), ctx.dp_rank, ctx.dp_size)).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, _whole(model, ctx))


def _fp16_both(ctx: ParallelContext) -> tuple[RunResult, RunResult]:
    return _fp16(ctx, 1), _fp16(ctx, 3)


def test_fp16_with_grad_scaler_equals_zero1_bit_for_bit() -> None:
    # At dp = 2 both sum the same two fp32 gradients (a + b either way) and divide by 2, step the
    # same fp32 master shards and round them once to fp16: ZeRO-3 changes where the weights live,
    # not one bit of what they are.
    for zero1, zero3_run in run_distributed(_fp16_both, 1, 1, 2, timeout=120):
        assert_matches_reference(zero3_run, zero1, EXACT)


# -- misuse -----------------------------------------------------------------------------------------
def test_a_bad_zero_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="zero_stage must be 1, 2 or 3, got 0"):
        DataParallel(nn.Linear(2, 2), None, zero_stage=0)  # type: ignore[arg-type]  # refused before ctx is read


def _without_optimizer(ctx: ParallelContext) -> str:
    model = DataParallel(LLAMA.build_model(), ctx, zero_stage=3).parallelize()
    with pytest.raises(ValueError) as err:
        model(**shard_batch(LLAMA.batch(0), ctx.dp_rank, ctx.dp_size))
    return str(err.value)


def test_a_training_forward_without_distributed_optimizer_is_refused_on_every_rank() -> None:
    for message in run_distributed(_without_optimizer, 1, 1, 2, timeout=60):
        assert "build DistributedOptimizer(optimizer, ctx)" in message


# -- bf16 -------------------------------------------------------------------------------------------
def _bf16(ctx: ParallelContext, before_dp: Wrap | None, whole: Callable[..., dict[str, torch.Tensor]]
          ) -> list[RunResult]:
    return [_run(ctx, BF16, before_dp=before_dp, whole=whole)]


def bf16_allowances() -> tuple[RunResult, Any, Any]:
    """The one-device bf16 recipe and the (losses, parameters) allowances of its noise floor."""
    reference = reference_run(BF16)
    return reference, *noise_floor_tolerances(reference, noise_floor_runs(BF16))


def check_bf16(tp: int, pp: int, dp: int, before_dp: Wrap | None = None,
               whole: Callable[..., dict[str, torch.Tensor]] = _whole) -> None:
    """A bf16 run at the layout (``before_dp`` applies tp and pp, ``whole`` gathers the parameters)
    within the one-device recipe's noise floor."""
    reference, losses, params = bf16_allowances()
    for rank, found in enumerate(run_distributed(_bf16, tp, pp, dp, before_dp, whole, timeout=180)):
        for result in found:
            try:
                assert_matches_reference(result, reference, losses, params)
            except AssertionError as err:
                raise AssertionError(f"rank {rank}: {err}\n({losses.why}; {params.why})") from err


def test_bf16_equals_the_one_device_bf16_recipe_within_its_noise_floor() -> None:
    check_bf16(1, 1, 2)
