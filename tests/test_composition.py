"""All three parallelisms at once (tp=2 x pp=2 x dp=2), with and without ZeRO-1, equal the
single-device run."""

import pytest
import torch

from goose_core import (DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel, TensorParallel,
                        clip_grad_norm_, full_state_dict)
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, train_loop)

# Two AdamW steps of the GQA Llama in float64: every layout only reorders fp64 sums (PARALLEL).
SPEC = TrainSpec(family="llama", steps=2)


def _three_d(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    model = TensorParallel(spec.build_model(), ctx).parallelize()
    model = PipelineParallel(model, ctx, num_microbatches=2).parallelize()
    model = DataParallel(model, ctx).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size))
    return RunResult(losses, full_state_dict(model, ctx))


def test_tp_pp_dp_equals_the_single_device_run() -> None:
    reference = reference_run(SPEC)
    for rank, result in enumerate(run_distributed(_three_d, 2, 2, 2, SPEC, timeout=180)):
        try:
            assert_matches_reference(result, reference, PARALLEL)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err


def _three_d_zero(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    model = TensorParallel(spec.build_model(), ctx).parallelize()
    model = PipelineParallel(model, ctx, num_microbatches=2).parallelize()
    model = DataParallel(model, ctx).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    clip = lambda: clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)  # noqa: E731
    losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size), clip)
    return RunResult(losses, full_state_dict(model, ctx))


# GPT-2 ties its embedding to the LM head, so the weight lives on the first and the last stage:
# its gradient is summed across the two before ZeRO-1 reduce-scatters it, and the norm counts it
# once. SGD keeps the comparison about those rules (AdamW would amplify last-bit differences).
@pytest.mark.parametrize("tp, pp, dp", [(1, 2, 2), (2, 2, 2)])
def test_zero1_with_clipping_over_a_pipeline_with_tied_embeddings(tp: int, pp: int, dp: int) -> None:
    spec = TrainSpec(family="gpt2", steps=2, optimizer="sgd", max_grad_norm=0.5)
    reference = reference_run(spec)
    for rank, result in enumerate(run_distributed(_three_d_zero, tp, pp, dp, spec, timeout=180)):
        try:
            assert_matches_reference(result, reference, PARALLEL)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err


# bf16 GPT-2 (tied embeddings) at pp=2 with fp32 masters: the first stage's embedding and the last
# stage's LM head are one weight held twice. Each step must leave both copies bit for bit equal,
# or the two stages train two different models (a checkpoint keeps one of them).
TIED_BF16 = TrainSpec(family="gpt2", steps=3, precision="bf16")


def _tied_copies(ctx: ParallelContext, zero: bool) -> tuple[int, torch.Tensor]:
    from goose_core.data import shard_batch
    from goose_core.optim import MasterWeights
    from goose_core.testing import at_layout

    model = at_layout(TIED_BF16.build_model(), ctx, num_microbatches=2)
    inner = TIED_BF16.build_optimizer(model.parameters())
    optimizer = DistributedOptimizer(inner, ctx) if zero else MasterWeights(inner)
    train_loop(model, optimizer, (shard_batch(TIED_BF16.batch(s), ctx.dp_rank, ctx.dp_size)
                                  for s in range(TIED_BF16.steps)))
    (copy,) = [p.detach().clone() for n, p in model.named_parameters() if "wte" in n]
    return ctx.pp_rank, copy


@pytest.mark.parametrize("dp, zero", [(1, False), (2, False), (2, True)], ids=["masters", "masters-dp2", "zero1-dp2"])
def test_the_two_copies_of_a_tied_embedding_stay_equal_in_bf16(dp: int, zero: bool) -> None:
    copies = run_distributed(_tied_copies, 1, 2, dp, zero, timeout=240)
    first = [c for stage, c in copies if stage == 0]
    last = [c for stage, c in copies if stage == 1]
    for a, b in zip(first, last):
        assert torch.equal(a, b), (f"the tied embedding's copies differ by {(a.float() - b.float()).abs().max():.3g} "
                                   f"after {TIED_BF16.steps} steps: the stages train different weights")
