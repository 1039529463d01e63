"""The harness must fail when goose is wrong: each test plants one bug a parallel run could have,
and checks that the comparison with the single-device run passes without it and fails with it.

The bugs are small on purpose (a gradient 0.1 % too large, one micro-batch of four missing): a
tolerance loose enough to let one of them through would hide it in goose too. SGD, because
Adam's update is nearly invariant to a gradient's scale and would blur the first one.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

from goose_core import DataParallel, ParallelContext, PipelineParallel, TensorParallel, full_state_dict
from goose_core.loss import count_items
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, train_loop)

SPEC = TrainSpec(family="llama", steps=2, optimizer="sgd")
TIED = TrainSpec(family="gpt2", steps=2, optimizer="sgd")
PADDED = TrainSpec(family="llama", steps=2, optimizer="sgd", padding="right", seed=1)


def _train(ctx: ParallelContext, model: nn.Module, spec: TrainSpec) -> RunResult:
    losses = train_loop(model, spec.build_optimizer(model.parameters()), spec.batches(ctx.dp_rank, ctx.dp_size))
    return RunResult(losses, full_state_dict(model, ctx))


def _scaled_gradient(ctx: ParallelContext, plant: bool) -> RunResult:
    """Data parallelism whose reduction returns one weight's gradient 0.1 % too large."""
    model = DataParallel(SPEC.build_model(), ctx).parallelize()
    if plant:
        model.model.layers[1].mlp.up_proj.weight.register_hook(lambda grad: grad * 1.001)
    return _train(ctx, model, SPEC)


def _mean_of_means(ctx: ParallelContext, plant: bool) -> RunResult:
    """Data parallelism on right-padded shards that averages each rank's own token mean."""
    model = DataParallel(PADDED.build_model(), ctx).parallelize()
    optimizer = PADDED.build_optimizer(model.parameters())
    losses = []
    for batch in PADDED.batches(ctx.dp_rank, ctx.dp_size):
        # The planted count is this shard's own (times dp, as DataParallel expects the whole
        # batch's): every rank then divides by its own number of targets.
        own = {"num_items_in_batch": int(count_items(batch["labels"])) * ctx.dp_size} if plant else {}
        loss = model(**batch, **own).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, full_state_dict(model, ctx))


def _dropped_microbatch(ctx: ParallelContext, plant: bool) -> RunResult:
    """A pipeline whose loss keeps micro-batch 1's value but drops its gradient."""
    model = SPEC.build_model()
    if plant:
        loss_fn, calls = model.loss_function, [0]

        def dropping(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = loss_fn(*args, **kwargs)
            calls[0] += 1
            return loss.detach() + 0 * loss if calls[0] % 4 == 2 else loss

        model.loss_function = dropping
    model = PipelineParallel(model, ctx, num_microbatches=4, recompute="never").parallelize()
    return _train(ctx, model, SPEC)


def _missing_all_reduce(ctx: ParallelContext, plant: bool) -> RunResult:
    """Tensor parallelism whose blocks skip the all-reduce of their input's gradient (Megatron's
    ``f``: the backward of the column-parallel layers that open every attention and MLP)."""
    if plant:
        import goose_core.tensor_parallel.layers as layers
        layers.copy_to_region = lambda x, group: x  # forward unchanged, backward not summed
    # goose's own first-backward check refuses this bug too (the norms' gradients then differ over
    # tp: tests/test_tensor_parallel_parallelize.py); off here, so the harness is what must catch it
    return _train(ctx, TensorParallel(SPEC.build_model(), ctx, check_grads=False).parallelize(), SPEC)


def _tied_on_one_stage(ctx: ParallelContext, plant: bool) -> RunResult:
    """GPT-2's tied embedding over two stages, its gradients never summed between them."""
    if plant:
        from goose_core.pipeline.tied import TiedGradients
        TiedGradients.sync = lambda self: setattr(self, "added", None)  # each stage keeps its part
    model = PipelineParallel(TIED.build_model(), ctx, num_microbatches=2).parallelize()
    return _train(ctx, model, TIED)


PLANTS: dict[str, tuple[Callable[..., RunResult], tuple[int, int, int], TrainSpec]] = {
    "gradient scaled by 1.001": (_scaled_gradient, (1, 1, 2), SPEC),
    "dp mean of per-rank means under uneven padding": (_mean_of_means, (1, 1, 2), PADDED),
    "one micro-batch's gradient dropped": (_dropped_microbatch, (1, 2, 1), SPEC),
    "missing all-reduce in a tp block's backward": (_missing_all_reduce, (2, 1, 1), SPEC),
    "tied weight updated on one stage only": (_tied_on_one_stage, (1, 2, 1), TIED),
}


@pytest.fixture(scope="module")
def references() -> dict[str, RunResult]:
    return {repr(spec): reference_run(spec) for spec in (SPEC, TIED, PADDED)}


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_the_harness_catches(name: str, references: dict[str, RunResult]) -> None:
    body, (tp, pp, dp), spec = PLANTS[name]
    reference = references[repr(spec)]
    for result in run_distributed(body, tp, pp, dp, False, timeout=120):
        assert_matches_reference(result, reference, PARALLEL)
    missed = []
    for rank, result in enumerate(run_distributed(body, tp, pp, dp, True, timeout=120)):
        try:
            assert_matches_reference(result, reference, PARALLEL)
            missed.append(rank)
        except AssertionError:
            pass
    assert not missed, f"planted bug '{name}' passed the comparison on ranks {missed}"
