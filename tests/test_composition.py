"""All three parallelisms at once (tp=2 x pp=2 x dp=2) equal the single-device run."""

from goose_core import DataParallel, ParallelContext, PipelineParallel, TensorParallel, full_state_dict
from goose_core.testing import REORDER, RunResult, TrainSpec, assert_matches_reference, reference_run, run_distributed, train_loop

# Two AdamW steps of the GQA Llama; REORDER because tensor parallelism splits matmuls along their
# reduction dimension (pipeline micro-batches and data shards only add SPLIT-sized reorderings).
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
            assert_matches_reference(result, reference, REORDER)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err
