"""All three parallelisms at once (tp=2 x pp=2 x dp=2), with and without ZeRO-1, equal the
single-device run."""

import pytest

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
